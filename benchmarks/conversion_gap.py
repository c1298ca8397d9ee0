"""How far each freshly converted student starts from the teacher (no training at all).

Prints validation perplexity and per-token KL(p_T || p_S) of every student right after
conversion, with and without QKV copying, on held-out blocks of the embedded corpus:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/conversion_gap.py [--blocks 4 --seq-len 128]
"""
import argparse
import warnings

import torch

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
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*k_proj.*")  # key-free mixers say so once each
    teacher, tok = load_teacher(args.teacher)
    blocks = token_blocks(tok, split="validation", seq_len=args.seq_len, max_blocks=args.blocks)
    base = perplexity_and_kl(teacher, None, blocks)["perplexity"]
    print(f"teacher perplexity on {args.blocks} x {args.seq_len} validation tokens: {base:.2f}\n")
    print("| student | ppl, QKV copied | KL | ppl, fresh QKV | KL |\n|---|---:|---:|---:|---:|")
    for arch in available():
        cells = []
        for qkv in (True, False):
            student = convert(teacher, arch, qkv_copy=qkv)
            with torch.no_grad():
                r = perplexity_and_kl(student, teacher, blocks)
            cells += [f"{r['perplexity']:,.1f}", f"{r['kl']:.2f}"]
            del student
        print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
