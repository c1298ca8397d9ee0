"""Run folders: where a student's training lives, how a stage proves it may be resumed or
reused, and the student a stage starts from.

A run lives in ``outputs/<arch>/<run_name>/``::

    params.yaml        the resolved parameters of the latest accepted call
    metrics.jsonl      one JSON object per line: training steps ("event": "step") and
                       validations ("event": "eval", "after": conversion|stageN|stageN@tokens)
    stageN/params.yaml the parameters that define stage N (a resume must match them)
    stageN/checkpoint.pt  resumable state while stage N runs (trainable tensors, optimizer,
                       scheduler, RNG, step, metrics offset), replaced atomically
    stageN/student.pt  the full student state dict when stage N finished
    stageN/done.json   summary (steps, tokens, wall time, last loss)
    stageN/start.json  the metrics offset when stage N started (removed when it finishes):
                       a resume before the first checkpoint truncates metrics.jsonl to it
    *.pt.sha256        the checksum of each .pt file, checked before it is loaded
    .lock              held by the process working on the run (linearize.runfiles.hold_lock)
    conversion/fitted_student.pt  the o_proj weights of the readout fit (when switched on),
                       with the parameters they depend on, so a run fits once
    final/             the student after the run's last enabled stage, a Hugging Face folder
                       (linearize.export.save_student_folder: from_pretrained, lm_eval --model hf)

This module is the one reader and writer of that layout: the training loop
(:mod:`linearize.training`), the pipeline (:mod:`linearize.stages`), the evaluation and the
study all go through :class:`Run`, :func:`read_metrics` and :func:`load_student`. What a stage
computes (its identity) is defined with the stages; here it is only stored and compared.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .paths import OUTPUTS
from .runfiles import (
    atomic_save,
    disk_full_error,
    hold_lock,
    is_disk_full,
    load_verified,
    read_jsonl,
    remove_stale_temp_files,
    repair_jsonl_tail,
)


class RunError(RuntimeError):
    """A run folder whose stored parameters disagree with the requested ones, or whose files
    contradict each other."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class Run:
    """``outputs/<arch>/<run_name>/``: parameters, metrics and per-stage checkpoints."""

    def __init__(self, params: dict, root: str | os.PathLike | None = None, is_main: bool = True):
        self.params = params
        self.dir = Path(root or OUTPUTS) / params["arch"] / params["run_name"]
        self.is_main = is_main

    def write_params(self) -> None:
        """The top-level params.yaml: written only once this call's parameters are accepted
        (a refused rerun used to overwrite it with the parameters it refused)."""
        if self.is_main:
            import yaml

            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "params.yaml", yaml.safe_dump(jsonable(self.params), sort_keys=False))

    def lock(self):
        """Hold the run folder for this process (a context manager; re-entrant). On taking it,
        temporary files of killed writers and a torn last metrics line are cleaned up."""
        from contextlib import contextmanager

        @contextmanager
        def held():
            if not self.is_main:  # the main process holds it for all of a launch's processes
                yield
                return
            with hold_lock(self.dir, f"run folder {self.dir}"):
                remove_stale_temp_files(self.dir)
                repair_jsonl_tail(self.metrics_path)
                for done in self.dir.glob("stage*/done.json"):  # killed while tidying up a finished stage
                    tidy_finished_stage(done.parent)
                yield

        return held()

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def stage_dir(self, stage: int) -> Path:
        path = self.dir / f"stage{stage}"
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, record: dict) -> None:
        if self.is_main:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)  # the first record may come before any stage
                with open(self.metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as err:
                if is_disk_full(err, self.metrics_path):
                    raise disk_full_error(err, self.metrics_path) from err
                raise

    def metrics_offset(self) -> int:
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def truncate_metrics(self, offset: int) -> None:
        """Drop lines logged after a checkpoint, so a resumed curve has no duplicate steps."""
        if self.is_main and self.metrics_path.exists() and self.metrics_path.stat().st_size > offset:
            with open(self.metrics_path, "r+b") as fh:
                fh.truncate(offset)

    def metrics(self) -> list[dict]:
        return read_metrics(self.dir)

    def evals(self) -> dict[str, dict]:
        return {r["after"]: r for r in self.metrics() if r.get("event") == "eval"}

    def done(self, stage: int) -> dict | None:
        path = self.dir / f"stage{stage}" / "done.json"
        return json.loads(path.read_text()) if path.exists() else None


# Keys that change what a run computes only when switched on: they enter a stage's identity
# only then, so run folders written before the key existed keep matching with it off.
OPTIONAL_KEYS = {"readout_fit_tokens": ("readout_fit_tokens", "readout_fit_ridge"),
                  "gate_init_tokens": ("gate_init_tokens",),
                  # beyond the paper: the softmax window (also in mixer_options, where the mixer reads it)
                  "hybrid_window": ("hybrid_window", "hybrid_sinks", "hybrid_mix"),
                  "hybrid_mix_lr": ("hybrid_mix_lr",),
                  "fit_spread": ("fit_spread",),
                  "train_corpus": ("train_corpus", "teacher_text_tokens", "teacher_text_prompt", "teacher_text_new")}

def check_identity(run: Run, stage: int, ident: dict) -> dict:
    """``ident`` (a stage's identity, :func:`linearize.stages.stage_identity`); RunError if the
    run folder holds this stage (finished or in progress) made with other parameters, so neither
    a resume nor a reuse mixes two settings."""
    path = run.dir / f"stage{stage}" / "params.yaml"
    if path.exists():
        import yaml

        stored = yaml.safe_load(path.read_text())
        if stored != ident:
            diff = sorted(k for k in set(stored) | set(ident) if stored.get(k) != ident.get(k))
            raise RunError(
                f"{path.parent} holds stage {stage} trained with other parameters (differing: {diff}). "
                "Choose another run_name, or delete that folder to start the stage over."
            )
    return ident


def convert_student(teacher, params: dict):
    """A fresh conversion. Seeded, so that mixers without copied weights start from the same
    random initialisation in every run with the same seed."""
    from accelerate.utils import set_seed

    from .convert import convert

    set_seed(params["seed"])
    return convert(
        teacher, params["arch"], qkv_copy=params["qkv_copy"], mixer_options=dict(params["mixer_options"]),
        chunk_size=params["chunk_size"], backend=params["backend"],
    )


def with_alignment_record(params: dict, root: str | os.PathLike | None = None) -> dict:
    """``params`` with ``matrix_mixing`` / ``h2h`` set to whether stage 1 / 2 actually finished
    in the run folder. Stage 3 alone (notebook 02) does not decide them, but its Run rewrites
    params.yaml, which the study reads to name a run's variant: without this, a KD-only run
    (Table 2) would be recorded with the defaults (True, True) and shown as "+ MM + H2H"."""
    run_dir = Path(root or OUTPUTS) / params["arch"] / params["run_name"]
    ran = {s: (run_dir / f"stage{s}" / "done.json").exists() for s in (1, 2)}
    return {**params, "matrix_mixing": ran[1], "h2h": ran[2]}


def latest_stage(run: Run, before: int) -> int | None:
    """The last finished stage < ``before`` in this run, if any."""
    for stage in range(before - 1, -1, -1):
        if run.done(stage) is not None:
            check_stage_files(run, stage)  # done.json without student.pt is an error, not "unfinished"
            return stage
    return None


def check_stage_files(run: Run, stage: int) -> None:
    """RunError when a stage's files contradict each other, instead of silently retraining it
    (a second curve in metrics.jsonl) or failing on a raw FileNotFoundError.

    A stage finishes by writing student.pt, then done.json, then removing checkpoint.pt and
    start.json; so student.pt without done.json is a kill inside that sequence only while
    checkpoint.pt or start.json still exists (the stage then resumes and rewrites student.pt)."""
    sdir = run.dir / f"stage{stage}"
    student, done = sdir / "student.pt", sdir / "done.json"
    if done.exists() and not student.exists():
        raise RunError(
            f"{done} says stage {stage} finished, but its weights {student} are missing. Restore student.pt, "
            f"or delete {sdir} (and the later stages' folders) to train stage {stage} again.")
    in_progress = (sdir / "checkpoint.pt").exists() or (sdir / "start.json").exists()
    if student.exists() and not done.exists() and not in_progress:
        raise RunError(
            f"{sdir} holds a finished stage {stage}'s weights (student.pt) but no done.json, so it is neither "
            f"finished nor resumable. Restore done.json, or delete {sdir} (and the later stages' folders) to "
            f"train stage {stage} again.")


def stage_student(run: Run, stage: int) -> dict:
    """The verified state dict of a finished stage."""
    check_stage_files(run, stage)
    path = run.dir / f"stage{stage}" / "student.pt"
    return load_verified(path, f"Delete {path.parent} (and the later stages' folders) to train stage {stage} again.",
                         map_location="cpu", weights_only=True)


def mark_stage_start(run: Run, sdir: Path) -> None:
    """A stage without a checkpoint: truncate metrics.jsonl to where an earlier, killed attempt
    started (its step lines before the first checkpoint would be logged again), or record where
    this attempt starts."""
    path = sdir / "start.json"
    if path.exists():
        run.truncate_metrics(json.loads(path.read_text())["metrics_offset"])
    elif run.is_main:
        atomic_write_text(path, json.dumps({"metrics_offset": run.metrics_offset()}))


def tidy_finished_stage(sdir: Path) -> None:
    """A finished stage keeps student.pt and done.json, not its resume state."""
    for name in ("checkpoint.pt.sha256", "checkpoint.pt", "start.json"):
        (sdir / name).unlink(missing_ok=True)


_CONVERSION_KEYS = ("arch", "teacher", "corpus", "val_fraction", "seq_len", "batch_size", "seed", "qkv_copy",
                    "mixer_options")


_FITTED = "self_attn.o_proj.weight"  # the tensors linearize.calibrate.fit_readouts rewrites


def _fit_identity(params: dict) -> dict:
    """What a fitted conversion depends on: the conversion (with the gate initialisation when
    it is on) and the fit's data and ridge."""
    ident = {k: params[k] for k in _CONVERSION_KEYS + OPTIONAL_KEYS["readout_fit_tokens"]}
    if params.get("gate_init_tokens"):
        ident["gate_init_tokens"] = params["gate_init_tokens"]
    if params.get("train_corpus"):  # the fit and the gate initialisation read the training text
        ident.update({k: params[k] for k in OPTIONAL_KEYS["train_corpus"]})
    if params.get("fit_spread"):
        ident["fit_spread"] = True
    return jsonable(ident)


def fit_blocks(train_blocks: torch.Tensor, tokens: int, params: dict, what: str) -> torch.Tensor:
    """The ceil(tokens / seq_len) blocks the readout fit or the gate initialisation reads: the
    first ones, or with ``fit_spread`` as many spread evenly over all of ``train_blocks`` (fixed
    either way, so every process and every resume reads the same)."""
    n = -(-tokens // train_blocks.shape[1])
    if n > len(train_blocks):
        raise ValueError(f"{what}={tokens} asks for {n} blocks; the corpus has {len(train_blocks)}.")
    if not params.get("fit_spread") or n == 1:
        return train_blocks[:n]
    return train_blocks[torch.linspace(0, len(train_blocks) - 1, n).round().long()]


def init_gates(student, teacher, params: dict, train_blocks: torch.Tensor | None, run: Run | None = None) -> None:
    """The optional decay-gate initialisation of a fresh conversion from the teacher's attention
    (``gate_init_tokens`` > 0, linearize.gate_init), on training blocks (:func:`fit_blocks`)."""
    from . import gate_init

    tokens = params.get("gate_init_tokens") or 0
    if tokens <= 0:
        return
    if train_blocks is None:
        raise ValueError("gate_init_tokens > 0 needs the training blocks to measure the teacher on.")
    blocks = fit_blocks(train_blocks, tokens, params, "gate_init_tokens")
    t = time.perf_counter()
    gammas = gate_init.teacher_retention(teacher, blocks, batch_size=params["batch_size"])
    changed = gate_init.init_gates(student, gammas)
    if run is not None:
        run.log({"event": "gate_init", "tokens": blocks.numel(), "wall_s": time.perf_counter() - t,
                 "mixers_changed": len(changed), "retention": gammas.tolist()})


def fit_readout(student, teacher, params: dict, train_blocks: torch.Tensor | None, run: Run | None = None) -> None:
    """The optional closed-form o_proj fit of a fresh conversion (``readout_fit_tokens`` > 0),
    on training blocks (:func:`fit_blocks`: fixed, so every process and every resume fits the same).

    With a run, the fitted student is kept in ``conversion/`` with what it depends on, and a
    later call with the same parameters loads it instead of fitting again: notebook 01 and 02
    both start from the conversion when stages 1-2 are off (about 25 s of fitting each)."""
    from .calibrate import fit_readouts

    tokens = params.get("readout_fit_tokens") or 0
    if tokens <= 0:
        return
    saved = run.dir / "conversion" / "fitted_student.pt" if run is not None else None
    if saved is not None and saved.exists():
        stored = load_verified(saved, f"Delete {saved} to fit again.", map_location="cpu", weights_only=True)
        if stored["identity"] == _fit_identity(params):
            student.load_state_dict(stored["state"], strict=False)  # the seeded conversion + fitted o_proj
            record = stored.get("record")
            if record is not None and not any(m.get("event") == "readout_fit" and m["rel_error_after"]
                                              == record["rel_error_after"] for m in run.metrics()):
                run.log(record)  # a kill came between saving the fit and logging it
            return  # a different identity is refitted and overwritten below
    if train_blocks is None:
        raise ValueError("readout_fit_tokens > 0 needs the training blocks to fit on.")
    blocks = fit_blocks(train_blocks, tokens, params, "readout_fit_tokens")
    t = time.perf_counter()
    device = next(teacher.parameters()).device
    student.to(device)
    fits = fit_readouts(student, teacher, blocks, ridge=params["readout_fit_ridge"],
                        batch_size=params["batch_size"])
    if run is not None:
        record = {"event": "readout_fit", "tokens": fits[0].tokens, "wall_s": time.perf_counter() - t,
                  "rel_error_before": [f.rel_error_before for f in fits],
                  "rel_error_after": [f.rel_error_after for f in fits]}
        if run.is_main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            # only what the fit wrote (30 x 576 x 576 floats, 40 MB, not the 540 MB student):
            # the conversion itself is seeded and made again on load; the record goes with it,
            # so a kill between saving and logging still logs it exactly once
            state = {k: v.detach().cpu() for k, v in student.state_dict().items() if k.endswith(_FITTED)}
            atomic_save({"identity": _fit_identity(params), "state": state, "record": record}, saved)
        run.log(record)


def load_student(run: Run, teacher, params: dict, before: int, train_blocks: torch.Tensor | None = None):
    """The student a stage starts from: the last finished earlier stage's weights, else a fresh
    conversion (with the readout fit when asked for; it needs ``train_blocks``). Returns
    ``(student, start)`` with start = "stageN" or "conversion"."""
    student = convert_student(teacher, params)
    stage = latest_stage(run, before)
    if stage is None:
        init_gates(student, teacher, params, train_blocks, run)  # a no-op unless switched on
        fit_readout(student, teacher, params, train_blocks, run)  # a no-op unless switched on
        return student, "conversion"
    student.load_state_dict(stage_student(run, stage))
    return student, f"stage{stage}"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of a run folder's metrics.jsonl, in the order written ([] when there is none
    yet); a torn last line (a killed or disk-full append) is dropped with a warning."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def metrics_frames(run_dir: str | os.PathLike):
    """``(steps, evals)`` pandas DataFrames of a run's metrics.jsonl: one row per logged
    training step (stage, step, tokens, loss, lr, ...) and one per validation (after, perplexity,
    kl, tokens, stage_wall_s, ...), in the order they were written."""
    import pandas as pd

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: this run has logged nothing yet.")
    records = read_metrics(run_dir)
    steps = pd.DataFrame([r for r in records if r.get("event") == "step"])
    evals = pd.DataFrame([r for r in records if r.get("event") == "eval"])
    return steps, evals
