"""Perplexity and per-token KL to the teacher on held-out token blocks.

Its own module (not part of :mod:`linearize.evaluate`, which re-exports it) because the training
stages validate with it while ``evaluate`` loads students from run folders through the stages:
here it depends on neither, so the two import no cycle. The teacher's logits come through
``teacher.teacher_logits``, which reuses them across validations where the pipeline set that up.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .teacher import teacher_logits


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def perplexity_and_kl(student, teacher, blocks: torch.Tensor, batch_size: int = 2) -> dict:
    """Validation perplexity of student and teacher, and the mean per-token KL(p_T || p_S).

    ``blocks``: LongTensor [N, seq_len] of held-out token ids (e.g. ``linearize.data``'s
    validation blocks). Perplexity is exp of the mean next-token cross-entropy over the
    N * (seq_len - 1) predicted positions. The KL is averaged over every position of every
    block (N * seq_len) - a mean over tokens, not the "batchmean" that sums over the sequence.
    ``teacher=None`` skips the KL and reports the student's perplexity only.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise ValueError(
            "blocks must be a LongTensor [N, seq_len] of token ids (e.g. from "
            f"linearize.data.token_blocks), got {getattr(blocks, 'dtype', type(blocks))} "
            f"with shape {tuple(getattr(blocks, 'shape', ()))}"
        )
    if blocks.shape[1] < 2:
        raise ValueError(f"blocks need at least 2 tokens each for perplexity, got {blocks.shape}")
    models = [m for m in (student, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(student.parameters()).device
    nll_s = nll_t = kl_sum = 0.0
    n_pred = n_tok = 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            targets = ids[:, 1:].reshape(-1)
            logp_s = F.log_softmax(_logits(student, ids), dim=-1)
            nll_s += F.nll_loss(logp_s[:, :-1].reshape(-1, logp_s.shape[-1]), targets, reduction="sum").item()
            n_pred += targets.numel()
            if teacher is not None:
                t_ids = ids.to(next(teacher.parameters()).device)
                logp_t = F.log_softmax(teacher_logits(teacher, t_ids).float().to(device), dim=-1)
                nll_t += F.nll_loss(logp_t[:, :-1].reshape(-1, logp_t.shape[-1]), targets, reduction="sum").item()
                # KL(p_T || p_S) per position, summed over the vocabulary; summed here over
                # positions and divided by the token count at the end.
                kl_sum += (logp_t.exp() * (logp_t - logp_s)).sum().item()
                n_tok += ids.numel()
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    out = {"perplexity": math.exp(nll_s / n_pred), "n_blocks": int(blocks.shape[0]),
           "seq_len": int(blocks.shape[1])}
    if teacher is not None:
        out["teacher_perplexity"] = math.exp(nll_t / n_pred)
        out["kl"] = kl_sum / n_tok
    return out
