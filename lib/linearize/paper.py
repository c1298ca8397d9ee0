"""The source paper's numbers, in one place: Haller, Golde & Akbik (2025), *Empirical Evaluation
of Knowledge Distillation from Transformers to Subquadratic Language Models* (restated in
docs/study.md).

Its teacher was SmolLM-360M, its students were trained on 1B FineWeb tokens, and its scores
are unnormalised zero-shot accuracy in percent (its LAMBADA is the mean of the standard and the
OpenAI version; ours is OpenAI only). Only the teacher has per-task numbers: for the students
the paper gives the six-task average. Table 2 students do not copy Q/K/V (each mixer starts
from its own initialisation); Table 3's ablations do.

``evaluate``, ``convert`` and ``study`` re-export what they used to define (``PAPER_ROWS``,
``COLUMNS``/``AVG``, ``PAPER_PARAMS_M``/``PAPER_REFERENCE_M``, ``PAPER_NAMES``).
"""
from __future__ import annotations

# Column label of each task in the paper's tables, in the paper's order.
COLUMNS = {
    "lambada_openai": "Lamb.",
    "winogrande": "WinoG.",
    "arc_easy": "Arc-E",
    "arc_challenge": "Arc-C",
    "piqa": "PIQA",
    "hellaswag": "HellaS.",
}
AVG = "Avg."

# The paper's names of our students (its rows read "Llama-<name>": teacher-student).
PAPER_NAMES = {
    "softmax": "Llama", "llama": "Llama", "xlstm": "xLSTM", "gla": "GLA", "hgrn2": "HGRN2",
    "retnet": "RetNet", "mamba2": "Mamba2", "metala": "MetaLA", "deltanet": "DeltaNet",
    "rebased": "ReBased", "hedgehog": "Hedgehog",
}

# Table 2: the teacher per task (its Avg. is the mean of the six).
TEACHER_SCORES = {"Lamb.": 49.26, "WinoG.": 59.35, "Arc-E": 70.24, "Arc-C": 36.65, "PIQA": 71.65,
                  "HellaS.": 43.11, AVG: 55.04}
# Table 2: six-task average of each student, (without, with) matrix mixing, no QKV copy.
TABLE2_AVG = {
    "softmax": (48.61, 49.98), "xlstm": (47.36, 47.95), "gla": (47.85, 47.78), "hgrn2": (47.48, 46.95),
    "retnet": (47.39, 47.27), "mamba2": (47.10, 46.16), "metala": (44.82, 46.97),
    "deltanet": (43.80, 42.93), "rebased": (43.39, 42.96), "hedgehog": (41.69, 42.80),
}
# Table 3: ablations on the two best students (six-task average), keyed by the paper's label.
TABLE3_AVG = {
    "Llama-xLSTM + QKV": 49.02,
    "Llama-xLSTM + QKV + MM": 48.98,
    "Llama-xLSTM + QKV + MM + H2H": 49.41,
    "Llama-GLA + QKV": 48.66,
    "Llama-GLA + QKV + MM + H2H": 48.58,
    "Llama-GLA + MM + H2H (no QKV)": 35.30,
}

# Parameter counts (millions) of the paper's students converted from SmolLM-360M; the
# Llama-Llama student is the 350M reference that growth is measured against.
PAPER_PARAMS_M = {
    "softmax": 350, "xlstm": 448, "gla": 420, "hgrn2": 409, "retnet": 566,
    "mamba2": 523, "metala": 448, "deltanet": 449, "rebased": 404, "hedgehog": 404,
}
PAPER_REFERENCE_M = PAPER_PARAMS_M["softmax"]

# Every number above as rows of a results table (percent), labelled as the paper's so they
# can never be mistaken for ours: the teacher, Table 2 without then with MM, then Table 3.
_PAPER = "paper, SmolLM-360M teacher: "
PAPER_ROWS: dict[str, dict[str, float]] = {
    _PAPER + "teacher": dict(TEACHER_SCORES),
    **{_PAPER + f"Llama-{PAPER_NAMES[s]}": {AVG: plain} for s, (plain, _) in TABLE2_AVG.items()},
    **{_PAPER + f"Llama-{PAPER_NAMES[s]} + MM": {AVG: mm} for s, (_, mm) in TABLE2_AVG.items()},
    **{_PAPER + label: {AVG: avg} for label, avg in TABLE3_AVG.items()},
}
