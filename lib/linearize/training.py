"""The training loop every stage runs, resumable and stage-agnostic.

A stage is a row of the table in :mod:`linearize.stages` (a :class:`StageSpec`: its name, the
parameters that define it, its loss step, what it trains, its schedule); :func:`train_stage`
runs any row the same way on ``accelerate``: a deterministic data order (:class:`BlockOrder`),
AdamW under a warmup-stable-decay or linear schedule (:func:`lr_factor`), gradient clipping,
a NaN guard, atomic checkpoints with the RNG and metrics offset, and curve points every
``eval_every_tokens``. Resume: calling a stage again continues from ``checkpoint.pt`` with the
same data order, optimizer, scheduler and RNG states, and truncates ``metrics.jsonl`` to what it
held at the checkpoint, so the curve equals an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .runfiles import atomic_save, load_verified
from .runs import Run, RunError, atomic_write_text, mark_stage_start, tidy_finished_stage


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


@dataclass(frozen=True)
class StageSpec:
    """One stage: everything the loop needs to know about it. The loss ``step`` is called as
    ``step(model, raw, teacher, ids, params, backward, autocast) -> (loss, extras)``: ``model``
    is the prepared (DDP-wrapped) student, ``raw`` the unwrapped one; it back-propagates through
    ``backward`` itself (a layer-local step does so once per layer) and returns the detached loss
    and a dict logged with the step."""
    number: int
    name: str
    keys: tuple[str, ...]  # the parameters that define what it computes (beside the common ones)
    flag: str  # the parameter that switches it on
    schedule: str  # lr_factor's kind
    layer_local: bool  # calls the student's layers directly: DDP's hooks never fire, the loop averages gradients
    step: Callable
    trainable: Callable[[dict], Callable[[str], bool]]  # params -> which parameter names train
    uses_lora: Callable[[dict], bool] = lambda params: False

    @property
    def tokens_key(self) -> str:
        return f"stage{self.number}_tokens"

    @property
    def lr_key(self) -> str:
        return f"stage{self.number}_lr"


def select_trainable(student: nn.Module, train: Callable[[str], bool], what: str = "") -> list[str]:
    """Set requires_grad by ``train(name)`` and return the names of the trainable parameters."""
    names = []
    for name, p in student.named_parameters():
        keep = bool(train(name))
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise RuntimeError(f"{what or 'this stage'} found no trainable parameters.")
    return names


def checkpoint_interval(every: int, total_steps: int) -> int:
    """Steps between checkpoints: ``checkpoint_every``, but at most half the stage, so every
    stage of two or more steps checkpoints at least once (cpu-quick's 8-step stages 1-2 with
    checkpoint_every=8 never did, and a kill restarted them)."""
    return max(1, min(every, total_steps // 2))


def _check_not_sharing(student: nn.Module, teacher: nn.Module) -> None:
    """Training must never write into the teacher: no parameter storage may be shared."""
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if p.data_ptr() in teacher_ptrs]
    if shared:
        raise RuntimeError(
            f"student parameters share storage with the teacher ({shared[:3]}...); training would "
            "modify the teacher. The converter must copy (clone) the teacher's tensors."
        )


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
    spec: StageSpec,
    student: nn.Module,
    teacher: nn.Module,
    train_blocks: torch.Tensor,
    params: dict,
    run: Run,
    ident: dict,
    start: str = "conversion",
    accelerator=None,
    progress: bool = True,
    on_tokens: Callable | None = None,
) -> StageResult:
    """Train stage ``spec`` of ``student`` against ``teacher`` for its token budget, resuming
    from ``run``'s checkpoint of this stage if there is one. ``ident`` is the stage's identity,
    already checked against the run folder (:func:`linearize.stages.train_stage` does both)."""
    from accelerate.utils import set_seed
    from tqdm import tqdm  # text, not a widget: under papermill a widget bar never reaches the log

    stage = spec.number
    accelerator = accelerator or make_accelerator(params)
    sdir = run.stage_dir(stage)
    run.write_params()
    if not (sdir / "params.yaml").exists() and run.is_main:
        import yaml

        atomic_write_text(sdir / "params.yaml", yaml.safe_dump(ident, sort_keys=False))

    _check_not_sharing(student, teacher)
    seq_len = train_blocks.shape[1]
    if seq_len != params["seq_len"]:
        raise ValueError(f"train blocks have seq_len {seq_len}, params say {params['seq_len']}.")
    bs, nproc = params["batch_size"], accelerator.num_processes
    tokens_per_step = bs * seq_len * nproc
    budget = params[spec.tokens_key]
    total_steps = max(1, budget // tokens_per_step)
    lr = params[spec.lr_key]

    set_seed(params["seed"])
    lora = spec.uses_lora(params)
    if lora:
        from .transfer import add_lora

        add_lora(student, params["lora_rank"])
    names = select_trainable(student, spec.trainable(params), f"stage {stage} ({spec.name})")
    named = dict(student.named_parameters())
    trainable = [named[n] for n in names]
    optimizer = make_adamw(_param_groups(names, named, lr, params), lr, params)
    schedule = lambda s: lr_factor(spec.schedule, s, total_steps, params["warmup_fraction"],  # noqa: E731
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
        mark_stage_start(run, sdir)
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
    bar = tqdm(total=total_steps, initial=step, desc=f"stage {stage} ({spec.name})",
               disable=not (progress and accelerator.is_local_main_process), unit="step")
    model.train()
    interrupted = False
    for (ids,) in loader:
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, extra = spec.step(model, raw, teacher, ids, params, backward, autocast)
        if spec.layer_local and nproc > 1:
            # Layer-local steps bypass DDP's forward, so average gradients by hand.
            for p in trainable:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not math.isfinite(loss_value):
            bar.close()
            where = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "none yet"
            raise NonFiniteLossError(
                f"stage {stage} ({spec.name}): loss is {loss_value} at step {step + 1}; the "
                f"parameters were not updated. Last good checkpoint: {where}. Lower {spec.lr_key}, "
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
    summary = {"stage": stage, "name": spec.name, "start": start, "steps": step,
               "total_steps": total_steps, "tokens": step * tokens_per_step, "wall_s": wall,
               "train_tok_s": step * tokens_per_step / compute_total if compute_total else None,
               # the median step (of this call) ignores the first step's one-off warm-up
               "median_step_tok_s": tokens_per_step / float(np.median(step_times)) if step_times else None,
               "last_loss": last_loss, "trainable_params": sum(p.numel() for p in trainable)}
    if interrupted:
        return StageResult(stage, student, step, step * tokens_per_step, wall, False, summary)
    if run.is_main:
        atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, sdir / "student.pt")
        atomic_write_text(sdir / "done.json", json.dumps(summary, indent=1))
        tidy_finished_stage(sdir)
    accelerator.wait_for_everyone()
    return StageResult(stage, student, step, step * tokens_per_step, wall, True, summary)


def _param_groups(names: list[str], named: dict, lr: float, params: dict) -> list[dict]:
    """AdamW's groups: every trainable parameter at the stage's rate, except a hybrid's learned
    mix logits when ``hybrid_mix_lr`` is set (their own rate, no weight decay, which would pull
    the mix towards 0.5). The schedule scales every group alike."""
    gate_lr = params.get("hybrid_mix_lr")
    gates = [n for n in names if n.endswith("hybrid.mix_logit")] if gate_lr else []
    rest = [named[n] for n in names if n not in gates]
    groups = [{"params": rest}] if rest else []
    if gates:
        groups.append({"params": [named[n] for n in gates], "lr": float(gate_lr), "weight_decay": 0.0})
    return groups


def make_adamw(groups: list[dict], lr: float, params: dict) -> torch.optim.AdamW:
    """AdamW with the stage's betas and weight decay, in torch's fused implementation: on the CPU
    the default one loops over the parameters in Python and took 9% of a stage-3 step on one
    core, the fused one a fifth of that (benchmarks/distill_step.py); the update is the same
    AdamW (test_training: test_fused_adamw_follows_the_default_implementation)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(params["betas"]), weight_decay=params["weight_decay"],
                             fused=True)


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
