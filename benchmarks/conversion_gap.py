"""How far each freshly converted student starts from the teacher (no training at all).

Prints validation perplexity and per-token KL(p_T || p_S) of every student right after
conversion, with and without QKV copying, on held-out blocks of the embedded corpus:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/conversion_gap.py [--blocks 4 --seq-len 128]

``--readout-fit N`` adds, for each, the same student after ``linearize.calibrate.fit_readouts``
on N training blocks (closed-form o_proj fit to the teacher's attention outputs); ``--gate-init N``
adds the QKV-copied student with its decay gates set from the teacher's attention distances on N
training blocks (``linearize.gate_init``), alone and before the fit; ``--students`` picks students
(default: all ten).
"""
import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from linearize.calibrate import fit_readouts
from linearize.convert import convert
from linearize.data import token_blocks
from linearize.evaluate import perplexity_and_kl
from linearize.gate_init import init_gates, teacher_retention
from linearize.mixers import available
from linearize.runs import fit_blocks
from linearize.teacher import load_teacher


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--readout-fit", type=int, default=0, metavar="N",
                        help="also fit every o_proj on N training blocks (0: off)")
    parser.add_argument("--fit-spread", action="store_true",
                        help="the fit's N blocks spread evenly over the training split (the recipe's fit_spread, "
                             "linearize.runs.fit_blocks) instead of the first N")
    parser.add_argument("--ridge", type=float, default=1e-2)
    parser.add_argument("--gate-init", type=int, default=0, metavar="N",
                        help="also set decay gates from the teacher's attention on N training blocks (0: off)")
    parser.add_argument("--students", default=",".join(available()))
    parser.add_argument("--out", default=None,
                        help="also write the table as a markdown page here, and its JSON twin beside it (.json)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines: list[str] = []
    # the page's numbers as data: one record per student and column (written with the page)
    data = {"command": command(), "started": started, "blocks": args.blocks, "seq_len": args.seq_len,
            "readout_fit_blocks": args.readout_fit, "fit_spread": args.fit_spread, "gate_init_blocks": args.gate_init,
            "ridge": args.ridge,
            "teacher_ppl": None, "rows": []}

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)
        if args.out:  # rewritten after every row, so a long run leaves what it has measured
            Path(args.out).write_text(page(lines, args, started))
            Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")

    warnings.filterwarnings("ignore", message=".*k_proj.*")  # key-free mixers say so once each
    teacher, tok = load_teacher(args.teacher)
    blocks = token_blocks(tok, split="validation", seq_len=args.seq_len, max_blocks=args.blocks)
    base = perplexity_and_kl(teacher, None, blocks)["perplexity"]
    data["teacher_ppl"] = base
    emit(f"Teacher perplexity on {args.blocks} x {args.seq_len} validation tokens: {base:.2f}.")
    calib = None
    if args.readout_fit:
        if args.fit_spread:
            train = token_blocks(tok, split="train", seq_len=args.seq_len)
            calib = fit_blocks(train, args.readout_fit * args.seq_len, {"fit_spread": True}, "--readout-fit")
            where = f"{calib.shape[0]} x {args.seq_len} training tokens spread evenly over the {len(train)} blocks " \
                    "of the training split (`--fit-spread`, as the recipe's `fit_spread`)"
        else:
            calib = token_blocks(tok, split="train", seq_len=args.seq_len, max_blocks=args.readout_fit)
            where = f"the first {calib.shape[0]} x {args.seq_len} training tokens"
        emit(f"Readout fit (`linearize.calibrate.fit_readouts`): {where}, ridge {args.ridge}.")
    gammas = None
    if args.gate_init:
        gate_blocks = token_blocks(tok, split="train", seq_len=args.seq_len, max_blocks=args.gate_init)
        gammas = teacher_retention(teacher, gate_blocks)
        emit(f"Gate init (`linearize.gate_init`): per-head retention from the teacher's attention on the first "
             f"{gate_blocks.shape[0]} x {args.seq_len} training tokens (median {gammas.median():.3f}, "
             f"range {gammas.min():.3f}-{gammas.max():.3f}).")
    emit()
    # (QKV copied, gates from the teacher, readout fit) per column
    columns = [(True, False, False)]
    if calib is not None:
        columns.append((True, False, True))
    if gammas is not None:
        columns.append((True, True, False))
        if calib is not None:
            columns.append((True, True, True))
    columns.append((False, False, False))
    if calib is not None:
        columns.append((False, False, True))

    def head(qkv, gate, fit):
        return ("QKV copied" if qkv else "fresh QKV") + (" + gates" if gate else "") + (" + fit" if fit else "")

    emit("| student | " + " | ".join(f"ppl, {head(*c)} | KL" for c in columns) + " |")
    emit("|---|" + "---:|---:|" * len(columns))
    for arch in args.students.split(","):
        cells = []
        for qkv, gate, fit in columns:
            torch.manual_seed(0)  # the parts not copied start from the same draw in every run
            student = convert(teacher, arch, qkv_copy=qkv)
            record = {"arch": arch, "qkv_copy": qkv, "gate_init": gate, "readout_fit": fit}
            if gate and not init_gates(student, gammas):
                cells += ["(no gates)", ""]
                data["rows"].append({**record, "ppl": None, "kl": None, "note": "no decay gates"})
                continue
            if fit:
                fit_readouts(student, teacher, calib, ridge=args.ridge)
            with torch.no_grad():
                r = perplexity_and_kl(student, teacher, blocks)
            cells += [f"{r['perplexity']:,.1f}", f"{r['kl']:.2f}"]
            data["rows"].append({**record, "ppl": r["perplexity"], "kl": r["kl"]})
            del student
        emit(f"| {arch} | " + " | ".join(cells) + " |")
    emit()
    data["finished"] = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    emit(f"Finished {data['finished']}.")


def command() -> str:
    return "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/conversion_gap.py " + shlex.join(sys.argv[1:])


def page(lines, args, started) -> str:
    return "\n".join([
        "# How far each student starts from the teacher (no training)",
        "",
        f"Generated by `benchmarks/conversion_gap.py` with its data beside it ({Path(args.out).with_suffix('.json').name}); "
        "do not edit by hand. Reproduce both with:",
        "",
        f"    {command()}",
        "",
        f"Started {started}. Perplexity on held-out blocks of the embedded corpus and per-token "
        "KL(teacher || student) in nats, float32 on the CPU; the parts a conversion does not copy are "
        "drawn with seed 0.",
        "",
        *lines,
        "",
    ])


if __name__ == "__main__":
    main()
