"""Where the readout fit reads: its blocks first in the training split, or spread over it.

The closed-form readout fit (``linearize.calibrate``) reads ceil(tokens / seq_len) training blocks.
Taken first (``fit_spread: false``, the default), they are consecutive text: on the mix, the first
8K tokens are parts of three documents. Spread evenly over the split (``fit_spread: true``) they
sample every source. This prints each student's validation perplexity over the teacher's and KL
right after conversion + fit (no training), both ways, on the preset's validation blocks and on
the out-of-domain set, in one process:

    OMP_NUM_THREADS=1 python benchmarks/fit_blocks.py --students deltanet,gla,xlstm
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="deltanet,gla,xlstm")
    parser.add_argument("--preset", default="cpu-recipe")
    parser.add_argument("--corpus", default="mix")
    parser.add_argument("--tokens", type=int, default=8192, help="readout_fit_tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from linearize import params as P
    from linearize.calibrate import fit_readouts
    from linearize.data import ood_blocks, token_blocks
    from linearize.perplexity import perplexity_and_kl
    from linearize.runs import convert_student, fit_blocks
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    teacher, tok = load_teacher()
    print("| student | fit reads | ppl / teacher | KL | OOD ppl / teacher | OOD KL | seconds |\n|---|---|---:|---:|---:|---:|---:|")
    for arch in args.students.split(","):
        prm = P.resolve(arch, args.preset, {"corpus": args.corpus, "readout_fit_tokens": args.tokens})
        train = token_blocks(tok, prm["corpus"], prm["seq_len"], "train", prm["val_fraction"])
        val = token_blocks(tok, prm["corpus"], prm["seq_len"], "validation", prm["val_fraction"],
                           max_blocks=prm["val_blocks"])
        ood = ood_blocks(tok, prm)
        for spread in (False, True):
            prm["fit_spread"] = spread
            student = convert_student(teacher, prm)
            t = time.perf_counter()
            fit_readouts(student, teacher, fit_blocks(train, args.tokens, prm, "readout_fit_tokens"),
                         ridge=prm["readout_fit_ridge"], batch_size=prm["batch_size"])
            r = perplexity_and_kl(student, teacher, val, batch_size=prm["val_batch_size"])
            o = perplexity_and_kl(student, teacher, ood, batch_size=prm["val_batch_size"])
            print(f"| {arch} | {'spread' if spread else 'first'} | {r['perplexity'] / r['teacher_perplexity']:.2f}x | "
                  f"{r['kl']:.3f} | {o['perplexity'] / o['teacher_perplexity']:.2f}x | {o['kl']:.3f} | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
