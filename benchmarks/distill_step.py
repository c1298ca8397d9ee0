"""Where a stage-3 (end-to-end distillation) step spends its time, against the reference of
issue 14: the teacher's plain forward+backward (LM loss) on the same batch.

One process, rounds interleaved (reference, then each distillation variant), each part timed
in this process's CPU seconds (``time.process_time``), so a loaded machine slows every part
alike rather than whichever ran during a spike. Parts of a distillation step: the teacher's
forward (no grad), the student's forward, the loss (CE + KL over the vocabulary), the
backward, gradient clipping and the optimizer step. Variants change one lever at a time:
the loss (autograd's composition, or ``losses.distillation_loss``'s closed-form gradient), the
optimizer's implementation (torch's default for-loop AdamW, ``foreach``, ``fused``), what
stage 3 trains (``stage3_train``: all / no-embeddings / mixers), and with ``+reuse`` the
teacher's outputs read back from ``linearize.teacher.TeacherOutputs`` (stored by the warm-up
round, as an earlier student of the grid stores them for the next: only the LM head runs), or
with ``+bf16`` the whole step (teacher forward, student forward, loss, backward) under bf16
autocast, as ``bf16: true`` trains; the reference stays the float32 teacher.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/distill_step.py --arch deltanet
    ... --threads 1 --batch 4 --seq 128 --rounds 3 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

CLOCK = time.process_time
PARTS = ("teacher_fwd", "student_fwd", "loss", "backward", "clip", "optimizer")


def reference_step(ref, ids, bf16: bool = False) -> float:
    """The teacher's plain forward+backward with its LM loss (no optimizer step), in float32 or
    under bf16 autocast."""
    from contextlib import nullcontext

    t = CLOCK()
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        out = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    ref.zero_grad(set_to_none=True)
    return CLOCK() - t


def autograd_loss(s_logits, t_logits, labels, alpha):
    """The loss as autograd composes it (what distillation_loss computed before its fused form)."""
    import torch.nn.functional as F
    from linearize import losses

    ce = F.cross_entropy(s_logits.flatten(0, -2), labels.flatten(), ignore_index=losses.IGNORE_INDEX)
    return ce + alpha * losses.per_token_kl(t_logits, s_logits)


def distill_parts(student, teacher, optimizer, trainable, ids, loss_kind, alpha=1.0, outputs=None,
                  bf16=False) -> dict:
    from contextlib import nullcontext

    from linearize import losses

    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    times = {}
    t = CLOCK()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), cast():
        t_logits = teacher(input_ids=ids).logits if outputs is None else outputs.logits(ids)
    times["teacher_fwd"] = CLOCK() - t
    t = CLOCK()
    with cast():
        s_logits = student(input_ids=ids).logits
    times["student_fwd"] = CLOCK() - t
    t = CLOCK()
    labels = losses.next_token_labels(ids)
    with cast():
        if loss_kind == "fused":
            total = losses.distillation_loss(s_logits, t_logits, labels, alpha, 1.0).total
        else:
            total = autograd_loss(s_logits, t_logits, labels, alpha)
    times["loss"] = CLOCK() - t
    t = CLOCK()
    total.backward()
    times["backward"] = CLOCK() - t
    t = CLOCK()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    times["clip"] = CLOCK() - t
    t = CLOCK()
    optimizer.step()
    times["optimizer"] = CLOCK() - t
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="deltanet")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--variants", default="autograd-default-all,fused-default-all,fused-fused-all,"
                                         "fused-fused-no-embeddings,fused-fused-mixers,fused-fused-all+reuse",
                   help="comma-separated LOSS-OPTIMIZER-TRAIN triples: LOSS in autograd|fused (the "
                        "loss before/after its closed-form gradient), OPTIMIZER in default|foreach|fused "
                        "(torch's AdamW implementations), TRAIN a stage3_train value; a +reuse suffix "
                        "reads the teacher's outputs back instead of running its body, +bf16 runs the "
                        "step under bf16 autocast")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--speed-json", default=None,
                   help="write the stage-3 ratio of the defaults (fused loss, fused AdamW, all parameters) "
                        "for benchmarks/speed.py --distill-json")
    args = p.parse_args(argv)

    from linearize.convert import convert
    from linearize.stages import stage3_trainable
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, _ = load_teacher()
    teacher.eval().requires_grad_(False)
    ref = copy.deepcopy(teacher).train().requires_grad_(True)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq))
    tokens = ids.numel()

    import tempfile

    from linearize.teacher import TeacherOutputs

    store = tempfile.TemporaryDirectory()
    setups = {}
    for variant in args.variants.split(","):
        base, *flags = variant.split("+")
        if not set(flags) <= {"reuse", "bf16"} or len(set(flags)) > 1:
            raise SystemExit(f"variant {variant!r}: one suffix at most, +reuse or +bf16")
        loss_kind, opt_kind, train = base.split("-", 2)
        outputs = TeacherOutputs(teacher, os.path.join(store.name, variant)) if "reuse" in flags else None
        student = convert(teacher, args.arch, qkv_copy=True).train()
        keep = stage3_trainable(train)
        for name, prm in student.named_parameters():
            prm.requires_grad_(keep(name))
        trainable = [prm for prm in student.parameters() if prm.requires_grad]
        kw = {} if opt_kind == "default" else {opt_kind: True}
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, **kw)
        setups[variant] = (student, optimizer, trainable, loss_kind, outputs, "bf16" in flags)

    # with a +bf16 variant, the teacher's fwd+bwd under bf16 too: the like-for-like reference
    any_bf16 = any(s[-1] for s in setups.values())
    ref_s, ref_bf16_s, parts = [], [], {v: {k: [] for k in PARTS} for v in setups}
    for r in range(args.rounds + 1):
        dt = reference_step(ref, ids)
        dt16 = reference_step(ref, ids, bf16=True) if any_bf16 else None
        if r:
            ref_s.append(dt)
            if any_bf16:
                ref_bf16_s.append(dt16)
        for variant, (student, optimizer, trainable, loss_kind, outputs, bf16) in setups.items():
            times = distill_parts(student, teacher, optimizer, trainable, ids, loss_kind, outputs=outputs, bf16=bf16)
            if r:
                for k in PARTS:
                    parts[variant][k].append(times[k])
        print(f"round {r}{' (warm-up)' if not r else ''} done", flush=True)

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    ref_med = med(ref_s)
    result = {"arch": args.arch, "threads": args.threads, "shape": f"{args.batch}x{args.seq}",
              "reference_s": ref_med, "reference_tok_s": tokens / ref_med, "variants": {},
              "load_average": os.getloadavg()[0]}
    print(f"\nteacher plain fwd+bwd: {ref_med:.3f} CPU s/step = {tokens / ref_med:.0f} tok/s "
          f"({args.batch}x{args.seq}, {args.threads} thread(s), median of {args.rounds})")
    ref16 = med(ref_bf16_s) if ref_bf16_s else None
    if ref16:
        result["reference_bf16_s"] = ref16
        print(f"teacher plain fwd+bwd under bf16 autocast: {ref16:.3f} CPU s/step ({ref_med / ref16:.2f}x float32's speed)")
    print(f"{'loss-optimizer-train':<28}" + "".join(f"{k:>12}" for k in PARTS) + f"{'step':>9}{'ratio':>8}")
    for variant in setups:
        m = {k: med(parts[variant][k]) for k in PARTS}
        # per-round sums, so the step's median is a real step's time
        step = med([sum(parts[variant][k][i] for k in PARTS) for i in range(args.rounds)])
        result["variants"][variant] = {"parts_s": m, "step_s": step, "over_teacher_fwd_bwd": ref_med / step}
        like = ""
        if setups[variant][-1] and ref16:  # a bf16 step against the bf16 teacher as well
            result["variants"][variant]["over_teacher_fwd_bwd_bf16"] = ref16 / step
            like = f"  ({ref16 / step:.2f} against the teacher's bf16 fwd+bwd)"
        print(f"{variant:<28}" + "".join(f"{m[k]:>12.3f}" for k in PARTS) + f"{step:>9.3f}{ref_med / step:>8.2f}"
              + like)
    print(f"load average {result['load_average']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    # the pipeline's default: fused loss, fused AdamW, all parameters, the teacher's outputs reused
    # (every grid cell after the first finds its stage-3 batches stored); the first student on a
    # batch set runs the teacher's body, given beside it
    default, first = "fused-fused-all+reuse", "fused-fused-all"
    v = result["variants"]
    if args.speed_json and default in v:
        without = (f"; without reuse (the first student on a batch set) {v[first]['over_teacher_fwd_bwd']:.2f}"
                   if first in v else "")
        with open(args.speed_json, "w") as f:
            json.dump({"distill_over_teacher_fwd_bwd": round(v[default]["over_teacher_fwd_bwd"], 3),
                       "source": f"benchmarks/distill_step.py --arch {args.arch}: {args.arch}'s stage-3 step "
                                 f"(fused loss, fused AdamW, all parameters, the teacher's outputs reused) against "
                                 f"the teacher's plain fwd+bwd, {result['shape']}, {args.threads} thread(s), CPU "
                                 f"seconds, median of {args.rounds} interleaved rounds, load "
                                 f"{result['load_average']:.1f}{without}"}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
