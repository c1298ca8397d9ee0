"""How far each freshly converted student starts from the teacher (no training at all).

Prints validation perplexity and per-token KL(p_T || p_S) of every student right after
conversion, with and without QKV copying, on held-out blocks of the embedded corpus:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/conversion_gap.py [--blocks 4 --seq-len 128]

``--readout-fit N`` adds, for each, the same student after ``linearize.calibrate.fit_readouts``
on N training blocks (closed-form o_proj fit to the teacher's attention outputs); ``--students``
picks students (default: all ten).
"""
import argparse
import warnings

import torch

from linearize.calibrate import fit_readouts
from linearize.convert import convert
from linearize.data import token_blocks
from linearize.evaluate import perplexity_and_kl
from linearize.mixers import available
from linearize.teacher import load_teacher


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--readout-fit", type=int, default=0, metavar="N",
                        help="also fit every o_proj on N training blocks (0: off)")
    parser.add_argument("--ridge", type=float, default=1e-2)
    parser.add_argument("--students", default=",".join(available()))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*k_proj.*")  # key-free mixers say so once each
    teacher, tok = load_teacher(args.teacher)
    blocks = token_blocks(tok, split="validation", seq_len=args.seq_len, max_blocks=args.blocks)
    base = perplexity_and_kl(teacher, None, blocks)["perplexity"]
    print(f"teacher perplexity on {args.blocks} x {args.seq_len} validation tokens: {base:.2f}\n")
    calib = None
    if args.readout_fit:
        calib = token_blocks(tok, split="train", seq_len=args.seq_len, max_blocks=args.readout_fit)
        print(f"readout fit: {calib.shape[0]} x {args.seq_len} training tokens, ridge {args.ridge}\n")
    heads = ["QKV copied", "fresh QKV"]
    if calib is not None:
        heads = ["QKV copied", "QKV copied + fit", "fresh QKV", "fresh QKV + fit"]
    print("| student | " + " | ".join(f"ppl, {h} | KL" for h in heads) + " |")
    print("|---|" + "---:|---:|" * len(heads))
    for arch in args.students.split(","):
        cells = []
        for qkv in (True, False):
            torch.manual_seed(0)  # the parts not copied start from the same draw in every run
            student = convert(teacher, arch, qkv_copy=qkv)
            fits = [False, True] if calib is not None else [False]
            for fit in fits:
                if fit:
                    fit_readouts(student, teacher, calib, ridge=args.ridge)
                with torch.no_grad():
                    r = perplexity_and_kl(student, teacher, blocks)
                cells += [f"{r['perplexity']:,.1f}", f"{r['kl']:.2f}"]
            del student
        print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
