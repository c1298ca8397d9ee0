"""Where a student loses to the teacher: tokens the context already holds vs the rest.

A target token is "copyable" when the same (previous token, token) bigram occurred earlier in
its block: the teacher predicts those almost for free by looking back (in-context retrieval,
what LAMBADA's last word needs), while a fixed-size recurrent state has to have kept them. The
script prints, for each run folder, the student's and the teacher's mean next-token NLL on both
kinds of tokens and the perplexity ratio, on evenly spread blocks of an out-of-domain corpus.

    python benchmarks/copy_gap.py outputs/deltanet/recipe-mix-kd64 outputs/deltanet/recipe-mix-at-w64
    python benchmarks/copy_gap.py RUN... --corpus wiki-val --seq-len 512 --blocks 6
"""
from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def copyable_mask(blocks: torch.Tensor) -> torch.Tensor:
    """[N, T-1] bool: target t+1 of block n repeats a bigram seen earlier in the block."""
    mask = torch.zeros(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.bool)
    for b, row in enumerate(blocks.tolist()):
        seen = set()
        for i in range(1, len(row)):
            mask[b, i - 1] = (row[i - 1], row[i]) in seen
            seen.add((row[i - 1], row[i]))
    return mask


@torch.no_grad()
def token_nll(model, blocks: torch.Tensor) -> torch.Tensor:
    lp = model(input_ids=blocks).logits.float().log_softmax(-1)
    return -lp[:, :-1].gather(-1, blocks[:, 1:, None])[..., 0]


def main(argv=None) -> int:
    from linearize.data import token_blocks
    from linearize.evaluate import load_model
    from linearize.teacher import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (outputs/<arch>/<run>) or saved student folders")
    ap.add_argument("--corpus", default="wiki-val")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, tok = load_teacher(None)
    blocks = token_blocks(tok, args.corpus, args.seq_len, "all")
    blocks = blocks[torch.linspace(0, len(blocks) - 1, min(args.blocks, len(blocks))).round().long()]
    mask = copyable_mask(blocks)
    t = token_nll(teacher, blocks)
    print(f"{args.corpus}: {blocks.shape[0]} blocks of {args.seq_len}; copyable share {mask.float().mean():.3f}; "
          f"load {os.getloadavg()[0]:.1f}")
    print("| student | tokens | teacher NLL | student NLL | ppl ratio |\n|---|---|---:|---:|---:|")
    for run in args.runs:
        s = token_nll(load_model(run)[0], blocks)
        for name, m in (("copyable", mask), ("other", ~mask)):
            print(f"| {run} | {name} | {t[m].mean():.3f} | {s[m].mean():.3f} | {torch.exp(s[m].mean() - t[m].mean()):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
