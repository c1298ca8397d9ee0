"""The three training stages on ``accelerate``, with resumable runs.

* stage 1, matrix mixing (MOHAWK stage 1): per layer, the student mixer's materialised mixing
  matrix A_S (from the teacher's normed layer input) is pulled towards the teacher's softmax
  attention A_T; loss = sum over layers of ``losses.matrix_mixing_loss``.
* stage 2, hidden-to-hidden (MOHAWK stage 2): per layer, the student decoder layer run on the
  teacher's layer input is pulled towards the teacher layer's output; loss = sum over layers of
  ``losses.hidden_loss``.
* stage 3, end-to-end distillation: ``losses.distillation_loss`` (CE + alpha * per-token KL).

Stages 1-2 are layer-local and train only mixer parameters (``layer.self_attn``): the teacher
is walked one layer at a time (``teacher.iter_layers``), each layer's loss is back-propagated
at once, so only one layer's T x T maps and graph exist at a time. Because they call the
student's layers directly (not the prepared model's forward), DDP's gradient hooks never fire;
with several processes the gradients are averaged explicitly before clipping. Stage 3 runs the
prepared model's forward, so ``accelerate launch`` distributes it the usual way.

A run lives in ``outputs/<arch>/<run_name>/``::

    params.yaml        the resolved parameters of the latest call
    metrics.jsonl      one JSON object per line: training steps ("event": "step") and
                       validations ("event": "eval", "after": conversion|stage1|stage2|stage3)
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

Resume: calling a stage again continues from ``checkpoint.pt`` with the same data order
(a function of seed and step), optimizer, scheduler and RNG states, and truncates
``metrics.jsonl`` to what it held at the checkpoint, so the curve equals an uninterrupted one.
A finished stage (``done.json``) is not trained again. A run folder is worked on by one process
at a time; the top-level ``params.yaml`` is written only once a call's parameters are accepted.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from . import losses
from .params import STAGE3_TRAIN  # defined with the other parameters (params imports no stage code)
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

# Stage 0 (attention-output transfer, linearize.transfer) is an extension that runs before
# the paper's three stages; the recipe that uses it skips stages 1-2.
STAGE_NAMES = {0: "attention transfer", 1: "matrix mixing", 2: "hidden-to-hidden", 3: "end-to-end distillation"}

# The parameters that define what a stage computes: a checkpoint or a finished stage is reused
# only when these match. Runtime knobs (logging, checkpoint cadence, early stop) may change.
_COMMON_KEYS = (
    "arch", "teacher", "corpus", "val_fraction", "seq_len", "batch_size", "seed", "qkv_copy",
    "chunk_size", "backend", "mixer_options", "weight_decay", "betas", "grad_clip",
    "warmup_fraction", "decay_fraction", "min_lr_ratio", "bf16",
)
_STAGE_KEYS = {
    0: ("stage0_tokens", "stage0_lr", "at_target", "at_train", "lora_rank"),
    1: ("stage1_tokens", "stage1_lr", "mm_loss"),
    2: ("stage2_tokens", "stage2_lr", "h2h_loss"),
    3: ("stage3_tokens", "stage3_lr", "kd_alpha", "kd_temperature", "stage3_train"),
}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


class RunError(RuntimeError):
    """A run folder whose stored parameters disagree with the requested ones, or whose files
    contradict each other."""


# ---------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
            _atomic_write_text(self.dir / "params.yaml", yaml.safe_dump(_jsonable(self.params), sort_keys=False))

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
                    _finish_files(done.parent)
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
        return read_jsonl(self.metrics_path)  # a torn last line is dropped with a warning

    def evals(self) -> dict[str, dict]:
        return {r["after"]: r for r in self.metrics() if r.get("event") == "eval"}

    def done(self, stage: int) -> dict | None:
        path = self.dir / f"stage{stage}" / "done.json"
        return json.loads(path.read_text()) if path.exists() else None


# Keys that change what a run computes only when switched on: they enter a stage's identity
# only then, so run folders written before the key existed keep matching with it off.
_OPTIONAL_KEYS = {"readout_fit_tokens": ("readout_fit_tokens", "readout_fit_ridge"),
                  "gate_init_tokens": ("gate_init_tokens",),
                  # beyond the paper: the softmax window (also in mixer_options, where the mixer reads it)
                  "hybrid_window": ("hybrid_window", "hybrid_sinks", "hybrid_mix")}


# Stage keys added after runs were made: they enter the identity only away from the value every
# earlier run implicitly had, so older run folders keep matching.
_STAGE_KEYS_IF_SET = {3: {"kd_ce_weight": 1.0}}


def stage_identity(params: dict, stage: int, start: str) -> dict:
    ident = {k: params[k] for k in _COMMON_KEYS + _STAGE_KEYS[stage]}
    for switch, keys in _OPTIONAL_KEYS.items():
        if params.get(switch):
            ident.update({k: params[k] for k in keys})
    for key, implicit in _STAGE_KEYS_IF_SET.get(stage, {}).items():
        if params.get(key, implicit) != implicit:
            ident[key] = params[key]
    if stage == 3 and params.get("stage3_train") == "lora":
        ident["lora_rank"] = params["lora_rank"]
    ident["start"] = start
    return _jsonable(ident)


# ---------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------
def check_stage_identity(run: Run, stage: int, params: dict, start: str) -> dict:
    """The stage's identity; RunError if the run folder holds this stage (finished or in
    progress) made with other parameters, so neither a resume nor a reuse mixes two settings."""
    ident = stage_identity(params, stage, start)
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


def checkpoint_interval(every: int, total_steps: int) -> int:
    """Steps between checkpoints: ``checkpoint_every``, but at most half the stage, so every
    stage of two or more steps checkpoints at least once (cpu-quick's 8-step stages 1-2 with
    checkpoint_every=8 never did, and a kill restarted them)."""
    return max(1, min(every, total_steps // 2))


def _stage_start(run: Run, sdir: Path) -> None:
    """A stage without a checkpoint: truncate metrics.jsonl to where an earlier, killed attempt
    started (its step lines before the first checkpoint would be logged again), or record where
    this attempt starts."""
    path = sdir / "start.json"
    if path.exists():
        run.truncate_metrics(json.loads(path.read_text())["metrics_offset"])
    elif run.is_main:
        _atomic_write_text(path, json.dumps({"metrics_offset": run.metrics_offset()}))


def _finish_files(sdir: Path) -> None:
    """A finished stage keeps student.pt and done.json, not its resume state."""
    for name in ("checkpoint.pt.sha256", "checkpoint.pt", "start.json"):
        (sdir / name).unlink(missing_ok=True)


_CONVERSION_KEYS = ("arch", "teacher", "corpus", "val_fraction", "seq_len", "batch_size", "seed", "qkv_copy",
                    "mixer_options")


_FITTED = "self_attn.o_proj.weight"  # the tensors linearize.calibrate.fit_readouts rewrites


def _fit_identity(params: dict) -> dict:
    """What a fitted conversion depends on: the conversion (with the gate initialisation when
    it is on) and the fit's data and ridge."""
    ident = {k: params[k] for k in _CONVERSION_KEYS + _OPTIONAL_KEYS["readout_fit_tokens"]}
    if params.get("gate_init_tokens"):
        ident["gate_init_tokens"] = params["gate_init_tokens"]
    return _jsonable(ident)


def init_gates(student, teacher, params: dict, train_blocks: torch.Tensor | None, run: Run | None = None) -> None:
    """The optional decay-gate initialisation of a fresh conversion from the teacher's attention
    (``gate_init_tokens`` > 0, linearize.gate_init), on the first training blocks."""
    from . import gate_init

    tokens = params.get("gate_init_tokens") or 0
    if tokens <= 0:
        return
    if train_blocks is None:
        raise ValueError("gate_init_tokens > 0 needs the training blocks to measure the teacher on.")
    n = -(-tokens // train_blocks.shape[1])
    if n > len(train_blocks):
        raise ValueError(f"gate_init_tokens={tokens} asks for {n} blocks; the corpus has {len(train_blocks)}.")
    t = time.perf_counter()
    gammas = gate_init.teacher_retention(teacher, train_blocks[:n], batch_size=params["batch_size"])
    changed = gate_init.init_gates(student, gammas)
    if run is not None:
        run.log({"event": "gate_init", "tokens": n * train_blocks.shape[1], "wall_s": time.perf_counter() - t,
                 "mixers_changed": len(changed), "retention": gammas.tolist()})


def fit_readout(student, teacher, params: dict, train_blocks: torch.Tensor | None, run: Run | None = None) -> None:
    """The optional closed-form o_proj fit of a fresh conversion (``readout_fit_tokens`` > 0),
    on the first training blocks (fixed, so every process and every resume fits the same).

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
    n = -(-tokens // train_blocks.shape[1])
    if n > len(train_blocks):
        raise ValueError(f"readout_fit_tokens={tokens} asks for {n} blocks; the corpus has {len(train_blocks)}.")
    t = time.perf_counter()
    device = next(teacher.parameters()).device
    student.to(device)
    fits = fit_readouts(student, teacher, train_blocks[:n], ridge=params["readout_fit_ridge"],
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


def _check_not_sharing(student: nn.Module, teacher: nn.Module) -> None:
    """Training must never write into the teacher: no parameter storage may be shared."""
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if p.data_ptr() in teacher_ptrs]
    if shared:
        raise RuntimeError(
            f"student parameters share storage with the teacher ({shared[:3]}...); training would "
            "modify the teacher. The converter must copy (clone) the teacher's tensors."
        )


def select_trainable(student: nn.Module, stage: int, stage3_train: str = "all") -> list[str]:
    """Set requires_grad for a stage and return the names of the trainable parameters.

    Stages 1-2 and stage3_train="mixers": the mixers (``model.layers[i].self_attn``) only.
    "no-embeddings": everything but the token embedding and the LM head. "all": everything."""
    if stage != 0 and stage3_train not in STAGE3_TRAIN:
        raise ValueError(f"stage3_train must be one of {STAGE3_TRAIN}, got {stage3_train!r}.")
    mode = "mixers" if stage in (1, 2) else stage3_train
    names = []
    for name, p in student.named_parameters():
        if stage == 0 or mode == "lora":
            from .transfer import trainable_mask

            # stage 0: stage3_train carries at_train; stage 3 "lora": adapters + mixer gates
            train = trainable_mask(name, stage3_train if stage == 0 else "lora")
        elif mode == "mixers":
            train = ".self_attn." in name
        elif mode == "no-embeddings":
            train = not (name.startswith("model.embed_tokens") or name.startswith("lm_head"))
        else:
            train = True
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise RuntimeError(f"stage {stage} found no trainable parameters (mode {mode!r}).")
    return names


# ---------------------------------------------------------------------------------------
# Data order and schedules
# ---------------------------------------------------------------------------------------
class BlockOrder(Sampler):
    """Indices of blocks in training order, from sample ``start`` for ``count`` samples.

    The order is a fresh permutation per epoch drawn from (seed, epoch) only, so the sample
    at any position is known without replaying the run: resume restarts at ``start``."""

    def __init__(self, num_blocks: int, seed: int, start: int, count: int):
        self.n, self.seed, self.start, self.count = num_blocks, seed, start, count

    def _epoch(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        pos = self.start
        end = self.start + self.count
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            perm = self._epoch(epoch)
            take = min(self.n - offset, end - pos)
            yield from perm[offset : offset + take].tolist()
            pos += take

    def __len__(self):
        return self.count


def lr_factor(kind: str, step: int, total: int, warmup_fraction: float, decay_fraction: float, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    "wsd": linear warmup, constant, then linear decay over the last ``decay_fraction`` of steps.
    "linear": linear warmup, then linear decay over all remaining steps.
    The decay is linear from 1 (at the step before it starts) to ``min_ratio`` one step past
    the last, so no step is wasted at a zero rate; warmup starts at 1/warmup_steps, not 0, so
    the first step already moves."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    decay_start = warmup if kind == "linear" else total - int(round(decay_fraction * total))
    decay_start = max(decay_start, warmup)
    if step < decay_start:
        return 1.0
    span = total - decay_start + 1
    progress = (step - decay_start + 1) / span  # would reach 1 one step after the last
    return 1.0 - (1.0 - min_ratio) * min(progress, 1.0)


# ---------------------------------------------------------------------------------------
# Loss steps
# ---------------------------------------------------------------------------------------
def _mixer_modules(student):
    return [layer.self_attn for layer in student.model.layers]


def matrix_mixing_step(student, teacher, ids, params, backward: Callable, autocast) -> tuple[torch.Tensor, list[float]]:
    """Stage 1 on one batch: per layer, backward of the layer's matrix-mixing loss."""
    from .teacher import iter_layers

    total, per_layer = 0.0, []
    layers = student.model.layers
    with autocast():
        for trace in iter_layers(teacher, ids, with_attention=True):
            layer = layers[trace.index]
            x = layer.input_layernorm(trace.hidden_in)
            a_s = layer.self_attn.mixing_matrix(x, trace.position_embeddings)
            loss = losses.matrix_mixing_loss(trace.attn, a_s, params["mm_loss"])
            backward(loss)
            per_layer.append(loss.item())
            total = total + loss.detach()
    return total, per_layer


def hidden_step(student, teacher, ids, params, backward: Callable, autocast) -> tuple[torch.Tensor, list[float]]:
    """Stage 2 on one batch: per layer, backward of the layer's hidden-to-hidden loss."""
    from .teacher import iter_layers

    total, per_layer = 0.0, []
    layers = student.model.layers
    with autocast():
        for trace in iter_layers(teacher, ids, with_attention=False):
            out = layers[trace.index](trace.hidden_in, position_embeddings=trace.position_embeddings)
            out = out[0] if isinstance(out, tuple) else out
            loss = losses.hidden_loss(trace.hidden_out, out, params["h2h_loss"])
            backward(loss)
            per_layer.append(loss.item())
            total = total + loss.detach()
    return total, per_layer


def distill_step(model, teacher, ids, params, backward: Callable, autocast) -> tuple[torch.Tensor, dict]:
    """Stage 3 on one batch: CE + alpha * per-token KL through the prepared model."""
    with autocast():
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = model(input_ids=ids).logits
        out = losses.distillation_loss(
            s_logits, t_logits, losses.next_token_labels(ids), params["kd_alpha"], params["kd_temperature"],
            ce_weight=params["kd_ce_weight"],
        )
    backward(out.total)
    return out.total.detach(), {"ce": out.ce.item(), "kl": out.kl.item()}


# ---------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------
@dataclass
class StageResult:
    stage: int
    student: nn.Module
    steps: int
    tokens: int
    wall_s: float
    finished: bool  # False when stop_after_steps cut it short (a checkpoint was written)
    summary: dict


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_accelerator(params: dict):
    """The Accelerator of a stage. Mixed precision is left to the launch configuration
    (``accelerate launch --mixed_precision ...``); ``params["bf16"]`` is applied by the stages
    themselves through ``torch.autocast`` (see ``autocast_for``), because accelerate fixes its
    precision once per process and a notebook may switch bf16 between calls."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Under DDP, a trainable parameter that gets no gradient in stage 3 (a mixer weight some
    # configuration leaves unused) would otherwise stop the run at the next step.
    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def autocast_for(accelerator, params: dict):
    """A context factory: bf16 autocast on the accelerator's device when params["bf16"], else
    whatever the launch configured (a no-op by default)."""
    if params["bf16"]:
        return lambda: torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16)
    return accelerator.autocast


def train_stage(
    stage: int,
    student: nn.Module,
    teacher: nn.Module,
    train_blocks: torch.Tensor,
    params: dict,
    run: Run,
    start: str = "conversion",
    accelerator=None,
    progress: bool = True,
    on_tokens: Callable | None = None,
) -> StageResult:
    """Train one stage (1, 2 or 3) of ``student`` against ``teacher`` for its token budget,
    resuming from ``run``'s checkpoint of this stage if there is one."""
    from accelerate.utils import set_seed
    from tqdm import tqdm  # text, not a widget: under papermill a widget bar never reaches the log

    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}.")
    accelerator = accelerator or make_accelerator(params)
    sdir = run.stage_dir(stage)
    ident = check_stage_identity(run, stage, params, start)
    check_stage_files(run, stage)
    run.write_params()
    if not (sdir / "params.yaml").exists() and run.is_main:
        import yaml

        _atomic_write_text(sdir / "params.yaml", yaml.safe_dump(ident, sort_keys=False))

    _check_not_sharing(student, teacher)
    seq_len = train_blocks.shape[1]
    if seq_len != params["seq_len"]:
        raise ValueError(f"train blocks have seq_len {seq_len}, params say {params['seq_len']}.")
    bs, nproc = params["batch_size"], accelerator.num_processes
    tokens_per_step = bs * seq_len * nproc
    budget = params[f"stage{stage}_tokens"]
    total_steps = max(1, budget // tokens_per_step)
    lr = params[f"stage{stage}_lr"]

    set_seed(params["seed"])
    lora = (stage == 0 and params["at_train"] == "lora") or (stage == 3 and params["stage3_train"] == "lora")
    if lora:
        from .transfer import add_lora

        add_lora(student, params["lora_rank"])
    names = select_trainable(student, stage, params["at_train"] if stage == 0 else params["stage3_train"])
    named = dict(student.named_parameters())
    trainable = [named[n] for n in names]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=tuple(params["betas"]), weight_decay=params["weight_decay"])
    kind = "linear" if stage == 3 else "wsd"
    schedule = lambda s: lr_factor(kind, s, total_steps, params["warmup_fraction"],  # noqa: E731
                                   params["decay_fraction"], params["min_lr_ratio"])
    # Not passed to accelerator.prepare: the prepared scheduler steps once per process per
    # optimizer step; here it steps exactly once per optimizer step on every process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    step, wall_prior, compute_prior = 0, 0.0, 0.0
    ckpt_path = sdir / "checkpoint.pt"
    if ckpt_path.exists():
        state = load_verified(ckpt_path, f"Delete {ckpt_path} to restart stage {stage} from its beginning.",
                              map_location="cpu", weights_only=False)
        missing = set(names) - set(state["trainable"])
        if missing:
            raise RunError(f"{ckpt_path} lacks trainable tensors {sorted(missing)[:3]}; delete it to restart the stage.")
        with torch.no_grad():
            for n in names:
                named[n].copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, wall_prior, compute_prior = state["step"], state["wall_s"], state["compute_s"]
        run.truncate_metrics(state["metrics_offset"])
        accelerator.print(f"stage {stage}: resuming at step {step}/{total_steps} from {ckpt_path}")
    else:
        _stage_start(run, sdir)
    every = checkpoint_interval(params["checkpoint_every"], total_steps)
    saved_step = step if ckpt_path.exists() else None  # the last good checkpoint, for error messages

    remaining = total_steps - step
    loader = DataLoader(
        TensorDataset(train_blocks),
        batch_size=bs,
        sampler=BlockOrder(len(train_blocks), params["seed"] + stage, step * bs * nproc, remaining * bs * nproc),
    )
    model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    teacher = teacher.to(accelerator.device)
    raw = accelerator.unwrap_model(model)

    autocast = autocast_for(accelerator, params)

    def backward(loss):
        accelerator.backward(loss)

    def save_checkpoint():
        nonlocal saved_step
        saved_step = step
        if run.is_main:
            atomic_save({
                "step": step,
                "trainable": {n: named[n].detach().cpu() for n in names},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "metrics_offset": run.metrics_offset(),
                "wall_s": wall_prior + (time.perf_counter() - t0),
                "compute_s": compute_prior + compute_s,
            }, ckpt_path)
        accelerator.wait_for_everyone()

    stop_at = params.get("stop_after_steps")
    t0, compute_s, last_loss, step_times = time.perf_counter(), 0.0, None, []
    bar = tqdm(total=total_steps, initial=step, desc=f"stage {stage} ({STAGE_NAMES[stage]})",
               disable=not (progress and accelerator.is_local_main_process), unit="step")
    model.train()
    interrupted = False
    for (ids,) in loader:
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        extra: dict = {}
        if stage == 0:
            from .transfer import attention_transfer_step

            loss, per_layer = attention_transfer_step(raw, teacher, ids, params, backward, autocast)
            extra["layer_losses"] = per_layer
        elif stage == 1:
            loss, per_layer = matrix_mixing_step(raw, teacher, ids, params, backward, autocast)
            extra["layer_losses"] = per_layer
        elif stage == 2:
            loss, per_layer = hidden_step(raw, teacher, ids, params, backward, autocast)
            extra["layer_losses"] = per_layer
        else:
            loss, extra = distill_step(model, teacher, ids, params, backward, autocast)
        if stage in (0, 1, 2) and nproc > 1:
            # Layer-local steps bypass DDP's forward, so average gradients by hand.
            for p in trainable:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not math.isfinite(loss_value):
            bar.close()
            where = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "none yet"
            raise NonFiniteLossError(
                f"stage {stage} ({STAGE_NAMES[stage]}): loss is {loss_value} at step {step + 1}; the "
                f"parameters were not updated. Last good checkpoint: {where}. Lower stage{stage}_lr, "
                "keep grad_clip on, or turn bf16 off."
            )
        grad_norm = None
        if params["grad_clip"]:
            grad_norm = float(accelerator.clip_grad_norm_(trainable, params["grad_clip"]))
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t_step
        compute_s += dt
        step_times.append(dt)
        last_loss = loss_value
        tok_s = tokens_per_step / dt
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{tok_s:.0f}")
        if step % params["log_every"] == 0 or step == total_steps:
            run.log({"event": "step", "stage": stage, "step": step, "tokens": step * tokens_per_step,
                     "loss": loss_value, "lr": current_lr, "grad_norm": grad_norm, "tok_s": tok_s, **extra})
        if stop_at is not None and step >= stop_at and step < total_steps:
            save_checkpoint()
            interrupted = True
            break
        if on_tokens is not None and params["eval_every_tokens"] and step < total_steps and (
                (step * tokens_per_step) // params["eval_every_tokens"]
                > ((step - 1) * tokens_per_step) // params["eval_every_tokens"]):
            # a point of the token-efficiency curve (validation of the student as it is now)
            raw.eval()
            on_tokens(raw, step * tokens_per_step, wall_prior + (time.perf_counter() - t0))
            raw.train()
        if step % every == 0 and step < total_steps:
            save_checkpoint()
    bar.close()

    wall = wall_prior + (time.perf_counter() - t0)
    student = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    student.requires_grad_(False)
    if lora and not interrupted:
        from .transfer import merge_lora

        merge_lora(student)  # student.pt keeps the converted model's keys
    accelerator.free_memory()
    compute_total = compute_prior + compute_s
    summary = {"stage": stage, "name": STAGE_NAMES[stage], "start": start, "steps": step,
               "total_steps": total_steps, "tokens": step * tokens_per_step, "wall_s": wall,
               "train_tok_s": step * tokens_per_step / compute_total if compute_total else None,
               # the median step (of this call) ignores the first step's one-off warm-up
               "median_step_tok_s": tokens_per_step / float(np.median(step_times)) if step_times else None,
               "last_loss": last_loss, "trainable_params": sum(p.numel() for p in trainable)}
    if interrupted:
        return StageResult(stage, student, step, step * tokens_per_step, wall, False, summary)
    if run.is_main:
        atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, sdir / "student.pt")
        _atomic_write_text(sdir / "done.json", json.dumps(summary, indent=1))
        _finish_files(sdir)
    accelerator.wait_for_everyone()
    return StageResult(stage, student, step, step * tokens_per_step, wall, True, summary)


# ---------------------------------------------------------------------------------------
# Throughput reference and validation
# ---------------------------------------------------------------------------------------
def teacher_train_throughput(teacher, ids: torch.Tensor, steps: int = 3, autocast=nullcontext) -> float:
    """Tokens/s of a plain forward+backward (LM loss) of the teacher on batches shaped like
    ``ids``: the reference the distillation throughput is compared to. The first step warms up
    and is not timed; gradients are dropped and the teacher is frozen again afterwards."""
    teacher.requires_grad_(True)
    try:
        elapsed = 0.0
        for i in range(steps + 1):
            t = time.perf_counter()
            with autocast():
                out = teacher(input_ids=ids, labels=ids)
            out.loss.backward()
            teacher.zero_grad(set_to_none=True)
            if i > 0:
                elapsed += time.perf_counter() - t
    finally:
        teacher.requires_grad_(False)
    return steps * ids.numel() / elapsed


@torch.no_grad()
def teacher_forward_throughput(teacher, ids: torch.Tensor, steps: int = 3, autocast=nullcontext) -> float:
    """Tokens/s of the teacher's plain forward on batches shaped like ``ids``: the reference of
    the layer-local stages (0-2), whose step is one teacher forward plus per-layer mixer work."""
    elapsed = 0.0
    for i in range(steps + 1):
        t = time.perf_counter()
        with autocast():
            teacher(input_ids=ids)
        if i > 0:
            elapsed += time.perf_counter() - t
    return steps * ids.numel() / elapsed


def validate(student, teacher, val_blocks: torch.Tensor, params: dict) -> dict:
    """Validation perplexity of the student and per-token KL(p_T || p_S), via linearize.perplexity."""
    from .perplexity import perplexity_and_kl

    return perplexity_and_kl(student, teacher, val_blocks, batch_size=params["val_batch_size"])


# ---------------------------------------------------------------------------------------
# The pipeline the notebooks call
# ---------------------------------------------------------------------------------------
def enabled_stages(params: dict, stages=(0, 1, 2, 3)) -> list[int]:
    flags = {0: params["attention_transfer"], 1: params["matrix_mixing"], 2: params["h2h"], 3: params["distill"]}
    return [s for s in stages if flags[s]]


def check_stages(stages) -> tuple[int, ...]:
    stages = tuple(stages)
    bad = [s for s in stages if isinstance(s, bool) or s not in STAGE_NAMES]
    if bad or not stages:
        raise ValueError(f"stages must be some of {sorted(STAGE_NAMES)} "
                         f"({', '.join(f'{k}: {v}' for k, v in STAGE_NAMES.items())}); got {list(stages)}.")
    return stages


def check_run_accepts(run: Run, params: dict, stages) -> None:
    """Before any work: RunError if the run folder holds any of the stages this call would
    train or reuse with other parameters, or stage files that contradict each other."""
    todo = enabled_stages(params, stages)
    if not todo:
        return
    latest = latest_stage(run, todo[0])
    start = "conversion" if latest is None else f"stage{latest}"
    for stage in todo:
        check_stage_identity(run, stage, params, start)
        check_stage_files(run, stage)
        start = f"stage{stage}"


def run_pipeline(params: dict, stages=(0, 1, 2, 3), teacher=None, tokenizer=None, root=None, progress: bool = True) -> dict:
    """Run the requested (and enabled) stages for one student, validating after conversion and
    after each stage. Finished stages are reused, an interrupted stage resumes. Returns a dict
    with the run, the final student and the stage results.

    Everything that can be checked without the teacher is checked first (parameters, stages,
    the run folder's identity), and the run folder is locked against a second process."""
    from .params import validate

    validate(params)
    stages = check_stages(stages)
    # the Accelerator (a per-process singleton state) knows the launch: under torch.distributed.run
    # with ACCELERATE_USE_CPU a bare PartialState() saw every rank as the main one, and each rank
    # then tried to take the run folder's lock
    run = Run(params, root=root, is_main=make_accelerator(params).is_main_process)
    with run.lock():
        check_run_accepts(run, params, stages)
        run.write_params()
        return _run_pipeline(params, stages, teacher, tokenizer, root, progress)


def _run_pipeline(params: dict, stages, teacher, tokenizer, root, progress: bool) -> dict:
    from .data import token_blocks
    from .teacher import load_teacher

    accelerator = make_accelerator(params)
    run = Run(params, root=root, is_main=accelerator.is_main_process)
    if teacher is None:
        teacher, tokenizer = load_teacher(params["teacher"])
    teacher = teacher.to(accelerator.device)
    train_blocks = token_blocks(tokenizer, params["corpus"], params["seq_len"], "train", params["val_fraction"])
    val_blocks = token_blocks(tokenizer, params["corpus"], params["seq_len"], "validation", params["val_fraction"],
                              max_blocks=params["val_blocks"])
    from .data import ood_blocks

    ood = ood_blocks(tokenizer, params)  # None when ood_corpus is ""
    todo = enabled_stages(params, stages)
    first = todo[0] if todo else max(stages) + 1
    student, start = load_student(run, teacher, params, first, train_blocks)
    student = student.to(accelerator.device)
    evals = run.evals()
    if start == "conversion" and "conversion" not in evals:
        _log_eval(run, "conversion", student, teacher, val_blocks, params, tokens=0, wall_s=0.0, ood=ood)
    results = []
    for stage in todo:
        done = run.done(stage)
        if done is not None and done.get("start") == start:
            check_stage_identity(run, stage, params, start)  # a finished stage is reused only as asked
            accelerator.print(f"stage {stage} already finished in {run.dir / f'stage{stage}'}; reusing it")
            student.load_state_dict(stage_student(run, stage))
            if stage == 3 and params["measure_teacher_throughput"] and "stage3" not in run.evals() and not any(
                    m.get("event") == "throughput" and m.get("stage") == 3 for m in run.metrics()):
                # killed between done.json and the throughput record: measure it now
                done = _log_throughput(run, done, teacher, train_blocks, params, accelerator)
        else:
            def on_tokens(model, tokens, wall_s, stage=stage):
                _log_eval(run, f"stage{stage}@{tokens}", model, teacher, val_blocks, params, tokens=tokens,
                          wall_s=wall_s, ood=ood)

            res = train_stage(stage, student, teacher, train_blocks, params, run, start=start,
                              accelerator=accelerator, progress=progress, on_tokens=on_tokens)
            results.append(res)
            student = res.student
            if not res.finished:
                accelerator.print(f"stage {stage} stopped after {res.steps} steps (stop_after_steps); "
                                  "run again to resume")
                return {"run": run, "student": student, "results": results, "finished": False}
            done = res.summary
            if stage == 3 and params["measure_teacher_throughput"]:
                done = _log_throughput(run, done, teacher, train_blocks, params, accelerator)
            elif stage in (0, 1, 2) and params["measure_teacher_throughput"]:
                ids = train_blocks[: params["batch_size"]].to(accelerator.device)
                ref = teacher_forward_throughput(teacher, ids, autocast=autocast_for(accelerator, params))
                run.log({"event": "throughput", "stage": stage, "train_tok_s": done["train_tok_s"],
                         "median_step_tok_s": done["median_step_tok_s"], "teacher_fwd_tok_s": ref,
                         "over_teacher_fwd": done["median_step_tok_s"] / ref})
        if f"stage{stage}" not in run.evals():
            _log_eval(run, f"stage{stage}", student, teacher, val_blocks, params,
                      tokens=done["tokens"], wall_s=done["wall_s"], ood=ood)
        start = f"stage{stage}"
    enabled = enabled_stages(params)
    if run.is_main and (not enabled or enabled[-1] in todo):
        # the run's last enabled stage is done: its student as a Hugging Face folder that
        # from_pretrained and lm_eval --model hf open directly (linearize.export)
        from .export import save_student_folder

        save_student_folder(student, tokenizer, run.dir / "final")
    return {"run": run, "student": student, "results": results, "finished": True}


def _log_throughput(run, done, teacher, train_blocks, params, accelerator) -> dict:
    ids = train_blocks[: params["batch_size"]].to(accelerator.device)
    ref = teacher_train_throughput(teacher, ids, autocast=autocast_for(accelerator, params))
    done = {**done, "teacher_fwd_bwd_tok_s": ref, "distill_over_teacher_fwd_bwd": done["median_step_tok_s"] / ref}
    run.log({"event": "throughput", "stage": 3, **{k: done[k] for k in (
        "train_tok_s", "median_step_tok_s", "teacher_fwd_bwd_tok_s", "distill_over_teacher_fwd_bwd")}})
    return done


def _log_eval(run, after, student, teacher, val_blocks, params, tokens, wall_s, ood=None):
    from .data import ood_perplexity_and_kl

    t = time.perf_counter()
    metrics = validate(student, teacher, val_blocks, params)
    metrics.update(ood_perplexity_and_kl(student, teacher, ood, batch_size=params["val_batch_size"]))
    run.log({"event": "eval", "after": after, "tokens": tokens, "stage_wall_s": wall_s,
             "eval_s": time.perf_counter() - t, **metrics})


# ---------------------------------------------------------------------------------------
# Reading a run back (notebooks, reports)
# ---------------------------------------------------------------------------------------
def metrics_frames(run_dir: str | os.PathLike):
    """``(steps, evals)`` pandas DataFrames of a run's metrics.jsonl: one row per logged
    training step (stage, step, tokens, loss, lr, ...) and one per validation (after, perplexity,
    kl, tokens, stage_wall_s, ...), in the order they were written."""
    import pandas as pd

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: this run has logged nothing yet.")
    records = read_jsonl(path)
    steps = pd.DataFrame([r for r in records if r.get("event") == "step"])
    evals = pd.DataFrame([r for r in records if r.get("event") == "eval"])
    return steps, evals


# ---------------------------------------------------------------------------------------
# Command line: python -m linearize.stages / accelerate launch -m linearize.stages
# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import argparse

    import yaml

    from . import params as P

    parser = argparse.ArgumentParser(
        prog="python -m linearize.stages",
        description="Run training stages for one student (the notebooks call the same run_pipeline). "
                    "Works unchanged under `accelerate launch -m linearize.stages ...`.")
    parser.add_argument("--arch", required=True, help="student mixer (linearize.mixers.available())")
    parser.add_argument("--preset", default=P.DEFAULT_PRESET, help=f"one of {', '.join(P.presets())}")
    parser.add_argument("--stages", default="0,1,2,3",
                        help="comma-separated stages to run (default 0,1,2,3; each runs only if enabled: "
                             "attention_transfer, matrix_mixing, h2h, distill)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter; VALUE is read as YAML (e.g. --set seq_len=256)")
    parser.add_argument("--root", default=None, help="outputs root (default outputs/)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        stages = check_stages(int(s) for s in args.stages.split(",") if s.strip())
    except ValueError as err:
        parser.error(f"--stages {args.stages!r}: {err}")
    params = P.resolve(args.arch, args.preset, overrides)
    out = run_pipeline(params, stages=stages, root=args.root)
    if out["run"].is_main:
        for record in out["run"].metrics():
            if record.get("event") in ("eval", "throughput"):
                print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
