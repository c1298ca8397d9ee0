"""Run parameters: defaults < preset < per-student settings < overrides.

``resolve(arch, preset="cpu-quick", overrides)`` gives one flat dict that the stages read and
that a run stores as ``params.yaml``. Presets live in ``params/presets/<name>.yaml``,
per-student settings in ``params/students.yaml`` (optional: a student without an entry takes
the preset as it is). An unknown key, preset or student fails with the valid choices; an override of ``None`` means "not set" (notebook parameters default to
None so that the preset decides).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .paths import ROOT

PARAMS_DIR = ROOT / "params"
DEFAULT_PRESET = "cpu-quick"
# What stage 3 may train (the stage3_train parameter): everything, the mixers only, or all but
# the embeddings and LM head.
STAGE3_TRAIN = ("all", "mixers", "no-embeddings", "lora")  # lora: peft adapters on q/k/v/o + mixer gates

# Every key a run understands, with its default and meaning.
DEFAULTS: dict[str, Any] = {
    "arch": None,  # student mixer name (linearize.mixers.available())
    "run_name": None,  # outputs/<arch>/<run_name>/; None -> the preset's name
    "preset": DEFAULT_PRESET,
    "teacher": "smollm2-135m-instruct",  # embedded default, a Llama hub id or a local folder
    "corpus": "embedded",  # see linearize.data
    # training text when not the corpus's own training split ("" = the corpus's; validation always
    # reads `corpus`): any source of linearize.data, or "teacher-text", documents the teacher
    # samples itself from prompts of the corpus's training split (linearize.teacher_text)
    "train_corpus": "",
    "teacher_text_tokens": 131072,  # with train_corpus "teacher-text": tokens to generate (prompts included)
    "teacher_text_prompt": 16,  # tokens of real text each sample starts from
    "teacher_text_new": 496,  # at most this many sampled tokens after each prompt
    "val_fraction": 0.05,  # documents held out for validation
    "seq_len": 128,
    "batch_size": 4,  # per process; global batch = batch_size * processes
    "val_blocks": 8,  # validation blocks of seq_len (ppl and KL after every stage)
    "val_batch_size": 4,
    # out-of-domain validation (linearize.data.ood_blocks): ood_perplexity / ood_kl after every
    # stage on blocks spread over a source never trained on; "" = off
    "ood_corpus": "wiki-val",
    "ood_val_blocks": 16,
    "seed": 0,
    # conversion
    "qkv_copy": True,  # copy the teacher's Q/K/V/O where the mixer has them (Table 2 turns it off)
    "chunk_size": 64,
    "backend": "auto",
    "mixer_options": {},
    # beyond the paper: an exact softmax window of hybrid_window tokens (0 = off) plus the first
    # hybrid_sinks positions beside the student's linear branch, mixed per head by a learned gate
    # that starts at hybrid_mix on the window (linearize.mixers.hybrid); copied into mixer_options
    "hybrid_window": 0,
    "hybrid_sinks": 4,
    "hybrid_mix": 0.99,
    # False: the mix stays at hybrid_mix (with hybrid_mix 1.0, the window alone: the control that
    # says what a hybrid owes to its window and what to its student)
    "hybrid_learn_mix": True,
    # the learned mix's own learning rate (None: the stage's). AdamW moves a parameter by about lr
    # per step, so at 1e-3 a 64-step stage can move the mix logit by 0.06 at most: the gates of the
    # first hybrids ended within 0.0004 of their 0.99 start (docs/recipe.md). Not weight-decayed.
    "hybrid_mix_lr": None,
    # closed-form o_proj fit after conversion (linearize.calibrate; an extension, 0 = off as in
    # the paper): ceil(tokens / seq_len) training blocks (fit_spread), ridge towards the copied o_proj
    # decay gates set per head from the teacher's attention distances (linearize.gate_init; an
    # extension, 0 = off): measured on ceil(tokens / seq_len) training blocks (fit_spread)
    "gate_init_tokens": 0,
    "readout_fit_tokens": 0,
    "readout_fit_ridge": 1.0e-2,
    # where the readout fit and the gate initialisation read their blocks: False, the first ones
    # (consecutive text: on the mix, its first 8K tokens are parts of three documents); True,
    # blocks spread evenly over the whole training split (docs/recipe.md measures both)
    "fit_spread": False,
    # which stages run
    "attention_transfer": False,  # stage 0 (an extension: linearize.transfer), before stages 1-3
    "matrix_mixing": True,  # stage 1
    "h2h": True,  # stage 2
    "distill": True,  # stage 3
    # token budgets
    "stage0_tokens": 65536,
    "stage1_tokens": 4096,
    "stage2_tokens": 4096,
    "stage3_tokens": 8192,
    # optimiser: AdamW
    "stage0_lr": 1.0e-3,
    "stage1_lr": 1.0e-3,
    "stage2_lr": 1.0e-3,
    "stage3_lr": 3.0e-4,
    "weight_decay": 0.0,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,  # max global grad norm; 0 or None turns clipping off
    # schedules: warmup-stable-decay (stages 1-2), linear warmup then linear decay (stage 3)
    "warmup_fraction": 0.1,
    "decay_fraction": 0.2,  # WSD: last fraction of steps decays linearly
    "min_lr_ratio": 0.0,  # the learning rate decays to lr * min_lr_ratio
    # losses
    "mm_loss": "frobenius",  # or "mse"
    "h2h_loss": "l2",  # or "mse"
    "kd_alpha": 1.0,  # L = kd_ce_weight * CE + kd_alpha * KL
    "kd_ce_weight": 1.0,  # 0: distil from the teacher's distribution alone (no next-token CE)
    "kd_temperature": 1.0,
    "stage3_train": "all",  # all | mixers | no-embeddings | lora (peft LoRA on q/k/v/o + mixer gates)
    # stage 0, attention-output transfer (linearize.transfer)
    "at_target": "output",  # output: after o_proj | heads: per-head outputs before o_proj
    "at_train": "mixers",  # mixers: all mixer parameters | gates: all but q/k/v/o | lora: gates + LoRA
    "lora_rank": 8,  # rank of the peft LoRA adapters (at_train or stage3_train "lora")
    "eval_every_tokens": 0,  # validate inside a stage every this many tokens (0: off); curves
    # runtime
    "bf16": False,  # bf16 autocast (CPU or GPU)
    "checkpoint_every": 16,  # steps between resumable checkpoints (and always at a stage's end)
    "log_every": 1,  # steps between metrics lines
    "measure_teacher_throughput": True,  # stage 3: teacher forward+backward tokens/s, same shapes
    "stop_after_steps": None,  # stop a stage early after this many steps (simulates a kill)
}


class ParamsError(ValueError):
    """An unknown key, preset or student, or a badly typed value."""


def presets() -> list[str]:
    return sorted(p.stem for p in (PARAMS_DIR / "presets").glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of parameter names to values.")
    return data


def _check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ParamsError(f"unknown parameter(s) {unknown} in {where}; valid keys: {', '.join(DEFAULTS)}")


def student_settings() -> dict[str, dict]:
    """The entries of params/students.yaml; a name there that is no registered mixer fails (a typo
    would otherwise be ignored silently)."""
    from . import mixers

    data = _load_yaml(PARAMS_DIR / "students.yaml")
    for name, settings in data.items():
        if name not in mixers.available():
            raise ParamsError(f"params/students.yaml has an entry for {name!r}, which is no registered mixer; "
                              f"registered: {', '.join(mixers.available())}")
        _check_keys(settings or {}, f"params/students.yaml [{name}]")
    return {k: (v or {}) for k, v in data.items()}


def resolve(arch: str | None = None, preset: str | None = None, overrides: dict | None = None) -> dict:
    """The flat parameter dict for one student: defaults < preset < student < overrides."""
    from . import mixers

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "the overrides")
    arch = arch or overrides.get("arch")
    preset = preset or overrides.get("preset") or DEFAULT_PRESET
    if arch is None:
        raise ParamsError(f"no student given; set arch to one of {', '.join(mixers.available())}.")
    try:
        arch = mixers.spec(arch).name  # resolves aliases, fails listing valid names
    except KeyError as err:
        raise ParamsError(err.args[0]) from None
    if preset not in presets():
        raise ParamsError(f"unknown preset {preset!r}; valid presets: {', '.join(presets())} (params/presets/*.yaml).")
    preset_values = _load_yaml(PARAMS_DIR / "presets" / f"{preset}.yaml")
    _check_keys(preset_values, f"params/presets/{preset}.yaml")
    params = {**DEFAULTS, **preset_values, **student_settings().get(arch, {}), **overrides}
    params["arch"], params["preset"] = arch, preset
    params["run_name"] = params["run_name"] or preset
    for key in params:
        params[key] = _as_number(key, params[key])
    _check_values(params)
    params["mixer_options"] = _with_hybrid(params)
    return params


# keys whose default is None but whose value, when set, is a number of this type
_NUMBER_TYPES = {"stop_after_steps": int, "grad_clip": float, "hybrid_mix_lr": float}


def _with_hybrid(p: dict) -> dict:
    """``mixer_options`` with the hybrid keys the mixer reads (unchanged when hybrid_window is 0,
    so the stage identities of runs made before the hybrid existed still match)."""
    from .mixers import hybrid

    options = dict(p["mixer_options"])
    wanted = hybrid.options_of(p["hybrid_window"], p["hybrid_sinks"], p["hybrid_mix"], p.get("hybrid_learn_mix", True))
    given = {k: options[k] for k in hybrid.OPTION_KEYS if k in options}
    clash = {k: v for k, v in given.items() if k not in wanted or wanted[k] != v}
    if clash:
        raise ParamsError(f"mixer_options {clash} set the hybrid window directly; use the keys hybrid_window, "
                          "hybrid_sinks, hybrid_mix and hybrid_learn_mix instead (they fill mixer_options).")
    try:
        hybrid.settings(wanted)
    except ValueError as err:
        raise ParamsError(str(err)) from None
    if wanted and p["arch"] == "softmax":
        raise ParamsError("hybrid_window is for the subquadratic students: the softmax student is exact "
                          "attention already; set hybrid_window=0 for it.")
    return {**options, **wanted}


def _as_number(key: str, value):
    """``value`` as the number type of ``DEFAULTS[key]`` where that default is a number.

    YAML 1.1 (PyYAML) reads ``1e-4`` without a dot as the *string* '1e-4', so
    ``--set stage2_lr=1e-4`` used to reach the optimiser as a string; such strings are parsed
    here, and anything that is not a number fails with the key's name."""
    default = _NUMBER_TYPES[key](0) if key in _NUMBER_TYPES else DEFAULTS.get(key)
    if value is None or isinstance(default, bool) or not isinstance(default, (int, float)):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ParamsError(f"{key} must be a number, got {value!r}.")
    if isinstance(default, int):
        if number != int(number):
            raise ParamsError(f"{key} must be a whole number, got {value!r}.")
        return int(number)
    return float(number)


def _check_values(p: dict) -> None:
    from .losses import HIDDEN_KINDS, MATRIX_MIXING_KINDS

    for key in ("seq_len", "batch_size", "val_blocks", "val_batch_size", "ood_val_blocks", "checkpoint_every",
                "log_every"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ParamsError(f"{key} must be a positive integer, got {p[key]!r}.")
    for key in ("stage0_tokens", "stage1_tokens", "stage2_tokens", "stage3_tokens", "eval_every_tokens"):
        if not isinstance(p[key], int) or p[key] < 0:
            raise ParamsError(f"{key} must be a non-negative integer (tokens), got {p[key]!r}.")
    if p["mm_loss"] not in MATRIX_MIXING_KINDS:
        raise ParamsError(f"mm_loss must be one of {MATRIX_MIXING_KINDS}, got {p['mm_loss']!r}.")
    if p["h2h_loss"] not in HIDDEN_KINDS:
        raise ParamsError(f"h2h_loss must be one of {HIDDEN_KINDS}, got {p['h2h_loss']!r}.")
    if p["stage3_train"] not in STAGE3_TRAIN:
        raise ParamsError(f"stage3_train must be one of {STAGE3_TRAIN}, got {p['stage3_train']!r}.")
    from .transfer import AT_TARGETS, AT_TRAIN

    if p["at_target"] not in AT_TARGETS:
        raise ParamsError(f"at_target must be one of {AT_TARGETS}, got {p['at_target']!r}.")
    if p["at_train"] not in AT_TRAIN:
        raise ParamsError(f"at_train must be one of {AT_TRAIN}, got {p['at_train']!r}.")
    if not isinstance(p["lora_rank"], int) or p["lora_rank"] < 1:
        raise ParamsError(f"lora_rank must be a positive integer, got {p['lora_rank']!r}.")
    if not 0 <= p["warmup_fraction"] <= 1 or not 0 <= p["decay_fraction"] <= 1:
        raise ParamsError("warmup_fraction and decay_fraction must lie in [0, 1].")
    if p["warmup_fraction"] + p["decay_fraction"] > 1:
        raise ParamsError("warmup_fraction + decay_fraction must not exceed 1 (warmup-stable-decay).")
    if not isinstance(p["gate_init_tokens"], int) or p["gate_init_tokens"] < 0:
        raise ParamsError(f"gate_init_tokens must be a non-negative integer (0: off), got {p['gate_init_tokens']!r}.")
    if p["readout_fit_tokens"] < 0 or p["readout_fit_ridge"] <= 0:
        raise ParamsError("readout_fit_tokens must be >= 0 (0: off) and readout_fit_ridge > 0.")
    if not isinstance(p["mixer_options"], dict):
        raise ParamsError(f"mixer_options must be a mapping, got {p['mixer_options']!r}.")
    _check_kinds(p)


# Switches: YAML reads true/false/yes/no as booleans; anything else (e.g. "maybe") is refused
# rather than read as truthy.
_BOOL_KEYS = ("qkv_copy", "matrix_mixing", "h2h", "distill", "bf16", "measure_teacher_throughput", "hybrid_learn_mix",
              "fit_spread")
_BACKENDS = ("auto", "torch", "fla")
# run_name is one folder under outputs/<arch>/: no separators, no "..", nothing absolute.
_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]*$")


def _finite(p: dict, key: str, low: float, strict: bool, why: str) -> None:
    v = p[key]
    if not math.isfinite(v) or (v <= low if strict else v < low):
        raise ParamsError(f"{key} must be {'>' if strict else '>='} {low:g} ({why}), got {v!r}.")


def _check_kinds(p: dict) -> None:
    """Types, ranges and choices of every key the checks above do not cover, so a bad value
    fails here, before the teacher loads, with the key's name - not mid-run in torch."""
    for key in _BOOL_KEYS:
        if not isinstance(p[key], bool):
            raise ParamsError(f"{key} must be true or false, got {p[key]!r}.")
    for key in ("teacher", "corpus"):
        if not isinstance(p[key], (str, os.PathLike)) or not str(p[key]).strip():
            raise ParamsError(f"{key} must be a non-empty name or path, got {p[key]!r}.")
    if not isinstance(p["train_corpus"], (str, os.PathLike)):
        raise ParamsError(f"train_corpus must be a name or path ('' = the corpus's own training split, "
                          f"'teacher-text' = text the teacher samples), got {p['train_corpus']!r}.")
    for key in ("teacher_text_tokens", "teacher_text_prompt", "teacher_text_new"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            raise ParamsError(f"{key} must be a positive integer (tokens), got {p[key]!r}.")
    name = p["run_name"]
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in (".", ".."):
        raise ParamsError(
            f"run_name must be a single folder name (letters, digits and ._+=@-, not starting with '.'; "
            f"no '/', '..' or absolute path), so the run stays inside outputs/<arch>/; got {name!r}.")
    if not isinstance(p["chunk_size"], int) or p["chunk_size"] < 1:
        raise ParamsError(f"chunk_size must be a positive integer, got {p['chunk_size']!r}.")
    if p["backend"] not in _BACKENDS:
        raise ParamsError(f"backend must be one of {_BACKENDS}, got {p['backend']!r}.")
    for stage in (1, 2, 3):
        _finite(p, f"stage{stage}_lr", 0, True, "a learning rate")
    if p.get("hybrid_mix_lr") is not None:
        _finite(p, "hybrid_mix_lr", 0, True, "the learned mix's learning rate; None: the stage's")
    _finite(p, "kd_alpha", 0, False, "the weight of the KL term")
    _finite(p, "kd_temperature", 0, True, "a softmax temperature")
    _finite(p, "weight_decay", 0, False, "AdamW's decoupled decay")
    if not 0 < p["val_fraction"] < 1:
        raise ParamsError(f"val_fraction must lie in (0, 1), got {p['val_fraction']!r}.")
    if not 0 <= p["min_lr_ratio"] <= 1:
        raise ParamsError(f"min_lr_ratio must lie in [0, 1], got {p['min_lr_ratio']!r}.")
    if p["grad_clip"] is not None:
        _finite(p, "grad_clip", 0, False, "a max gradient norm; 0 or null turns clipping off")
    betas = p["betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ParamsError(f"betas must be two numbers in [0, 1) (AdamW's beta1, beta2), e.g. [0.9, 0.95]; got {betas!r}.")
    stop = p["stop_after_steps"]
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < 1):
        raise ParamsError(f"stop_after_steps must be a positive whole number of steps or null, got {stop!r}.")
    if not isinstance(p["seed"], int):
        raise ParamsError(f"seed must be a whole number, got {p['seed']!r}.")
    # An enabled stage must train at least one step: fewer tokens used to train one step anyway.
    step_tokens = p["batch_size"] * p["seq_len"]
    for stage, switch in ((0, "attention_transfer"), (1, "matrix_mixing"), (2, "h2h"), (3, "distill")):
        if p[switch] and p[f"stage{stage}_tokens"] < step_tokens:
            raise ParamsError(
                f"stage{stage}_tokens={p[f'stage{stage}_tokens']} is less than one step (batch_size x seq_len = "
                f"{step_tokens} tokens); raise it, or set {switch}=false to skip stage {stage}.")
    options = p["mixer_options"]
    if options:
        from . import mixers

        cls = mixers.get(p["arch"])
        declared = set(cls.declared_options())
        if getattr(cls, "supports_hybrid", False):
            from .mixers import hybrid

            declared |= set(hybrid.OPTION_KEYS)  # filled from hybrid_window & co. by resolve
        unknown = sorted(str(k) for k in set(options) - declared)
        if unknown:
            raise ParamsError(
                f"mixer_options {unknown} are not options of {p['arch']}; its options: "
                f"{', '.join(sorted(declared)) or 'none'}.")


def validate(params: dict) -> dict:
    """Check a resolved parameter dict again (callers may build or edit one by hand): every
    key known, every value of the right type and range. Returns it unchanged."""
    _check_keys(params, "the parameters")
    missing = sorted(set(DEFAULTS) - set(params))
    if missing:
        raise ParamsError(f"parameters {missing} are missing; build the dict with linearize.params.resolve().")
    checked = {k: _as_number(k, v) for k, v in params.items()}
    _check_values(checked)
    return params
