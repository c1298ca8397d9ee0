"""The training stages and the pipeline the notebooks call, on ``accelerate``, with resumable runs.

* stage 0, attention-output transfer (an extension, :mod:`linearize.transfer`): per layer, the
  student mixer on the teacher's layer input is regressed onto the teacher's attention output.
* stage 1, matrix mixing (MOHAWK stage 1): per layer, the student mixer's materialised mixing
  matrix A_S (from the teacher's normed layer input) is pulled towards the teacher's softmax
  attention A_T; loss = sum over layers of ``losses.matrix_mixing_loss``.
* stage 2, hidden-to-hidden (MOHAWK stage 2): per layer, the student decoder layer run on the
  teacher's layer input is pulled towards the teacher layer's output; loss = sum over layers of
  ``losses.hidden_loss``.
* stage 3, end-to-end distillation: ``losses.distillation_loss`` (CE + alpha * per-token KL).

Each stage is one row of :data:`STAGES` (a :class:`linearize.training.StageSpec`: name, the
parameters that define it, the switch, its loss step, what it trains, its schedule); the loop in
:mod:`linearize.training` runs every row the same way. A new stage is a loss step and a row.

Stages 0-2 are layer-local and train only mixer parameters (``layer.self_attn``): the teacher
is walked one layer at a time (``teacher.iter_layers``), each layer's loss is back-propagated
at once, so only one layer's T x T maps and graph exist at a time. Because they call the
student's layers directly (not the prepared model's forward), DDP's gradient hooks never fire;
with several processes the gradients are averaged explicitly before clipping. Stage 3 runs the
prepared model's forward, so ``accelerate launch`` distributes it the usual way.

A run lives in ``outputs/<arch>/<run_name>/`` (the layout: :mod:`linearize.runs`). A finished
stage is not trained again; an interrupted one resumes. A run folder is worked on by one
process at a time; the top-level ``params.yaml`` is written only once a call's parameters are
accepted.
"""
from __future__ import annotations

import json
import time

import torch

from . import losses, training
from .memory import keep_freed_memory
from .params import STAGE3_TRAIN  # defined with the other parameters (params imports no stage code)
from .runs import (
    OPTIONAL_KEYS,
    Run,
    check_identity,
    check_stage_files,
    jsonable,
    latest_stage,
    load_student,
    stage_student,
)
from .teacher import teacher_logits
from .training import StageSpec, autocast_for, make_accelerator, teacher_forward_throughput, teacher_train_throughput

# The parameters that define what every stage computes: a checkpoint or a finished stage is
# reused only when these (and the stage's own keys) match. Runtime knobs (logging, checkpoint
# cadence, early stop) may change.
_COMMON_KEYS = (
    "arch", "teacher", "corpus", "val_fraction", "seq_len", "batch_size", "seed", "qkv_copy",
    "chunk_size", "backend", "mixer_options", "weight_decay", "betas", "grad_clip",
    "warmup_fraction", "decay_fraction", "min_lr_ratio", "bf16",
)


# ---------------------------------------------------------------------------------------
# Loss steps: (model, raw, teacher, ids, params, backward, autocast) -> (loss, extras)
# ---------------------------------------------------------------------------------------
def _layer_local_step(raw, teacher, ids, backward, autocast, with_attention: bool, layer_loss) -> tuple:
    """Walk the teacher one layer at a time; back-propagate each layer's loss at once."""
    from .teacher import iter_layers

    total, per_layer = 0.0, []
    layers = raw.model.layers
    with autocast():
        for trace in iter_layers(teacher, ids, with_attention=with_attention):
            loss = layer_loss(layers[trace.index], trace)
            backward(loss)
            per_layer.append(loss.item())
            total = total + loss.detach()
    return total, {"layer_losses": per_layer}


def attention_transfer_step(model, raw, teacher, ids, params, backward, autocast):
    """Stage 0 on one batch (linearize.transfer)."""
    from .transfer import attention_transfer_step as step

    loss, per_layer = step(raw, teacher, ids, params, backward, autocast)
    return loss, {"layer_losses": per_layer}


def matrix_mixing_step(model, raw, teacher, ids, params, backward, autocast):
    """Stage 1 on one batch: per layer, the matrix-mixing loss of the student's mixing matrix."""
    def layer_loss(layer, trace):
        a_s = layer.self_attn.mixing_matrix(layer.input_layernorm(trace.hidden_in), trace.position_embeddings)
        return losses.matrix_mixing_loss(trace.attn, a_s, params["mm_loss"])

    return _layer_local_step(raw, teacher, ids, backward, autocast, True, layer_loss)


def hidden_step(model, raw, teacher, ids, params, backward, autocast):
    """Stage 2 on one batch: per layer, the hidden-to-hidden loss of the student's decoder layer."""
    def layer_loss(layer, trace):
        out = layer(trace.hidden_in, position_embeddings=trace.position_embeddings)
        out = out[0] if isinstance(out, tuple) else out
        return losses.hidden_loss(trace.hidden_out, out, params["h2h_loss"])

    return _layer_local_step(raw, teacher, ids, backward, autocast, False, layer_loss)


def distill_step(model, raw, teacher, ids, params, backward, autocast):
    """Stage 3 on one batch: CE + alpha * per-token KL through the prepared model."""
    with autocast():
        with torch.no_grad():
            t_logits = teacher_logits(teacher, ids)  # reused across students where set up
        s_logits = model(input_ids=ids).logits
        out = losses.distillation_loss(
            s_logits, t_logits, losses.next_token_labels(ids), params["kd_alpha"], params["kd_temperature"],
            ce_weight=params["kd_ce_weight"],
        )
    backward(out.total)
    return out.total.detach(), {"ce": out.ce.item(), "kl": out.kl.item()}


# ---------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------
def _mixers(name: str) -> bool:
    return ".self_attn." in name


def stage3_trainable(mode: str):
    """The parameter names stage 3 trains under ``stage3_train``: "all"; "mixers"
    (``model.layers[i].self_attn``); "no-embeddings" (all but the token embedding and LM head);
    "lora" (the peft adapters and the mixers' gates, linearize.transfer.trainable_mask)."""
    if mode not in STAGE3_TRAIN:
        raise ValueError(f"stage3_train must be one of {STAGE3_TRAIN}, got {mode!r}.")
    if mode == "lora":
        from .transfer import trainable_mask

        return lambda name: trainable_mask(name, "lora")
    if mode == "mixers":
        return _mixers
    if mode == "no-embeddings":
        return lambda name: not name.startswith(("model.embed_tokens", "lm_head"))
    return lambda name: True


def _transfer_trainable(params: dict):
    from .transfer import trainable_mask

    at_train = params["at_train"]
    return lambda name: trainable_mask(name, at_train)


# ---------------------------------------------------------------------------------------
# The stage table
# ---------------------------------------------------------------------------------------
STAGES: dict[int, StageSpec] = {s.number: s for s in (
    # an extension that runs before the paper's three stages; the recipe that uses it skips 1-2
    StageSpec(0, "attention transfer", ("stage0_tokens", "stage0_lr", "at_target", "at_train", "lora_rank"),
              flag="attention_transfer", schedule="wsd", layer_local=True, step=attention_transfer_step,
              trainable=_transfer_trainable, uses_lora=lambda p: p["at_train"] == "lora"),
    StageSpec(1, "matrix mixing", ("stage1_tokens", "stage1_lr", "mm_loss"),
              flag="matrix_mixing", schedule="wsd", layer_local=True, step=matrix_mixing_step,
              trainable=lambda p: _mixers),
    StageSpec(2, "hidden-to-hidden", ("stage2_tokens", "stage2_lr", "h2h_loss"),
              flag="h2h", schedule="wsd", layer_local=True, step=hidden_step,
              trainable=lambda p: _mixers),
    StageSpec(3, "end-to-end distillation", ("stage3_tokens", "stage3_lr", "kd_alpha", "kd_temperature", "stage3_train"),
              flag="distill", schedule="linear", layer_local=False, step=distill_step,
              trainable=lambda p: stage3_trainable(p["stage3_train"]), uses_lora=lambda p: p["stage3_train"] == "lora"),
)}
STAGE_NAMES = {n: s.name for n, s in STAGES.items()}

# Stage keys added after runs were made: they enter the identity only away from the value every
# earlier run implicitly had, so older run folders keep matching.
_STAGE_KEYS_IF_SET = {3: {"kd_ce_weight": 1.0}}


def stage_identity(params: dict, stage: int, start: str) -> dict:
    """The parameters that define what stage ``stage`` computes when started from ``start``."""
    ident = {k: params[k] for k in _COMMON_KEYS + STAGES[stage].keys}
    for switch, keys in OPTIONAL_KEYS.items():
        if params.get(switch):
            ident.update({k: params[k] for k in keys})
    for key, implicit in _STAGE_KEYS_IF_SET.get(stage, {}).items():
        if params.get(key, implicit) != implicit:
            ident[key] = params[key]
    if stage == 3 and params.get("stage3_train") == "lora":
        ident["lora_rank"] = params["lora_rank"]
    ident["start"] = start
    return jsonable(ident)


def check_stage_identity(run: Run, stage: int, params: dict, start: str) -> dict:
    """The stage's identity; RunError if the run folder holds this stage with other parameters."""
    return check_identity(run, stage, stage_identity(params, stage, start))


def train_stage(stage: int, student, teacher, train_blocks: torch.Tensor, params: dict, run: Run,
                start: str = "conversion", accelerator=None, progress: bool = True, on_tokens=None):
    """Train stage ``stage`` (a key of :data:`STAGES`) of ``student`` for its token budget,
    resuming from ``run``'s checkpoint of this stage if there is one
    (:func:`linearize.training.train_stage`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}.")
    ident = check_stage_identity(run, stage, params, start)
    check_stage_files(run, stage)
    return training.train_stage(STAGES[stage], student, teacher, train_blocks, params, run, ident, start=start,
                                accelerator=accelerator, progress=progress, on_tokens=on_tokens)


def validate(student, teacher, val_blocks: torch.Tensor, params: dict) -> dict:
    """Validation perplexity of the student and per-token KL(p_T || p_S), via linearize.perplexity."""
    from .perplexity import perplexity_and_kl

    return perplexity_and_kl(student, teacher, val_blocks, batch_size=params["val_batch_size"])


# ---------------------------------------------------------------------------------------
# The pipeline the notebooks call
# ---------------------------------------------------------------------------------------
def enabled_stages(params: dict, stages=(0, 1, 2, 3)) -> list[int]:
    return [s for s in stages if params[STAGES[s].flag]]


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
    keep_freed_memory()  # every step's logits are large blocks: reuse them, do not refault them
    # the Accelerator (a per-process singleton state) knows the launch: under torch.distributed.run
    # with ACCELERATE_USE_CPU a bare PartialState() saw every rank as the main one, and each rank
    # then tried to take the run folder's lock
    run = Run(params, root=root, is_main=make_accelerator(params).is_main_process)
    with run.lock():
        check_run_accepts(run, params, stages)
        run.write_params()
        return _run_pipeline(params, stages, teacher, tokenizer, root, progress)


def training_blocks(teacher, tokenizer, params: dict, progress: bool = True) -> torch.Tensor:
    """The run's training blocks: the training split of ``corpus``, or all of ``train_corpus``
    when set (for ``"teacher-text"``, generated by the teacher first if not cached)."""
    from .data import check_ood_disjoint, token_blocks

    source = params.get("train_corpus") or ""
    if not source:
        return token_blocks(tokenizer, params["corpus"], params["seq_len"], "train", params["val_fraction"])
    if source == "teacher-text":
        from .teacher_text import ensure_corpus

        source = str(ensure_corpus(teacher, tokenizer, params, progress=progress))
    else:
        if params.get("ood_corpus"):
            check_ood_disjoint(source, params["ood_corpus"])
        check_ood_disjoint(source, params["corpus"], role="corpus")  # nor the validation split's text
    # a separate training source is read whole: its documents are not the validation's
    return token_blocks(tokenizer, source, params["seq_len"], "all")


def _run_pipeline(params: dict, stages, teacher, tokenizer, root, progress: bool) -> dict:
    from .data import token_blocks
    from .teacher import load_teacher, reuse_outputs

    accelerator = make_accelerator(params)
    run = Run(params, root=root, is_main=accelerator.is_main_process)
    if teacher is None:
        teacher, tokenizer = load_teacher(params["teacher"])
    teacher = teacher.to(accelerator.device)
    if getattr(teacher, "linearize_outputs", None) is None:
        # stage 3 and validation read the teacher's outputs on batches every cell shares
        reuse_outputs(teacher)
    train_blocks = training_blocks(teacher, tokenizer, params, progress=progress)
    if params.get("train_corpus") == "teacher-text" and not any(m.get("event") == "teacher_text" for m in run.metrics()):
        from .teacher_text import meta

        # its generation is part of the run's cost (wall_s), like the readout fit
        run.log({"event": "teacher_text", **meta(params)})
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
            if params["measure_teacher_throughput"] and f"stage{stage}" not in run.evals() and not any(
                    m.get("event") == "throughput" and m.get("stage") == stage for m in run.metrics()):
                # killed between done.json and the throughput record: measure it now
                done = _log_throughput(run, stage, done, teacher, train_blocks, params, accelerator)
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
            if params["measure_teacher_throughput"]:
                done = _log_throughput(run, stage, done, teacher, train_blocks, params, accelerator)
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


def _log_throughput(run, stage, done, teacher, train_blocks, params, accelerator) -> dict:
    """The stage's speed against the teacher's on the same batch: a layer-local stage (one teacher
    forward plus per-layer mixer work) against the teacher's forward, distillation against its
    forward + backward."""
    ids = train_blocks[: params["batch_size"]].to(accelerator.device)
    autocast = autocast_for(accelerator, params)
    if STAGES[stage].layer_local:
        ref = teacher_forward_throughput(teacher, ids, autocast=autocast)
        run.log({"event": "throughput", "stage": stage, "train_tok_s": done["train_tok_s"],
                 "median_step_tok_s": done["median_step_tok_s"], "teacher_fwd_tok_s": ref,
                 "over_teacher_fwd": done["median_step_tok_s"] / ref})
        return done
    ref = teacher_train_throughput(teacher, ids, autocast=autocast)
    done = {**done, "teacher_fwd_bwd_tok_s": ref, "distill_over_teacher_fwd_bwd": done["median_step_tok_s"] / ref}
    run.log({"event": "throughput", "stage": stage, **{k: done[k] for k in (
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
