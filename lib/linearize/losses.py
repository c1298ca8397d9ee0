"""The three training objectives: end-to-end distillation, matrix mixing, hidden-to-hidden.

Every reduction is spelled out here because the source paper's formulas were lost and peers'
code differs in exactly these details (docs/study.md):

* ``distillation_loss``  L = CE + alpha * KL, where
      CE = mean over labelled positions of -log p_S(label)              (temperature 1)
      KL = tau^2 * mean over the B*T positions of
           sum_v p_T^tau(v) * (log p_T^tau(v) - log p_S^tau(v)),
  with p^tau = softmax(logits / tau). The KL is a *per-token* mean: ``F.kl_div(...,
  reduction="batchmean")`` on a (B, T, V) tensor divides by B only and so is T times larger.
  The tau^2 factor (Hinton et al., 2015) keeps the gradient scale of the KL term independent
  of tau, so alpha means the same at every temperature; at tau = 1 it is 1.
* ``matrix_mixing_loss`` one layer's distance between teacher attention A_T and the student's
  materialised mixing matrix A_S, both [B, H, T, T] with head h of the student aligned to head
  h of the teacher (the converter keeps the teacher's query-head layout, see mixers/base.py):
      "frobenius": (1/B) sum_b sum_h || A_T[b,h] - A_S[b,h] ||_F
      "mse":       mean over all B*H*T*T entries of (A_T - A_S)^2
  (the paper's L_MM sums this over layers; the stages sum the per-layer values).
* ``hidden_loss`` one layer's distance between teacher and student output hidden states
  [B, T, D]:
      "l2":  mean over the B*T positions of || h_T[b,t] - h_S[b,t] ||_2
      "mse": mean over all B*T*D entries of (h_T - h_S)^2
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MATRIX_MIXING_KINDS = ("frobenius", "mse")
HIDDEN_KINDS = ("l2", "mse")
IGNORE_INDEX = -100


@dataclass
class DistillationLoss:
    """The total loss and its two parts (the parts detached, for logging)."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def next_token_labels(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned with the logits: position t is labelled with token t+1; the last
    position of each row has no next token and gets ``ignore_index``."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _check_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> None:
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ; both must be [..., vocab] over the same positions."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def per_token_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau^2 * mean over positions of KL(p_T^tau || p_S^tau); logits [..., V], mask [...] (bool).

    Computed in float32 (at least) whatever the logits' dtype: bf16 log-probabilities lose the
    small differences the KL is made of."""
    _check_logits(teacher_logits, student_logits, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [...] one value per position
    if mask is not None:
        kl = kl[mask]
        if kl.numel() == 0:
            raise ValueError("the KL mask selects no position.")
    return kl.mean() * temperature**2


class _FusedDistillation(torch.autograd.Function):
    """ce_weight * CE + alpha * KL and their gradient with respect to the student's logits in one
    pass over the [N, V] logits.

    Why: over a 49K vocabulary the loss is a memory-bound chain of full-size temporaries
    (two log-softmaxes, the CE's own log-softmax, exp, difference, product) and autograd keeps
    and walks them again backward; on one CPU core that was 7% of a distillation step and its
    backward as much again (benchmarks/distill_step.py). The gradient is closed-form:
        d total / d s = ce_weight / N_lab * [labelled] * (softmax(s) - onehot(label))
                        + alpha * tau / N * (softmax(s / tau) - softmax(t / tau)),
    computed in the forward into one buffer, which backward only scales."""

    @staticmethod
    def forward(ctx, s, t, labels, alpha, temperature, ce_weight, ignore_index):
        n = s.shape[0]
        valid = labels != ignore_index
        n_lab = int(valid.sum())
        rows = torch.arange(n, device=s.device)[valid]
        picked = labels[valid]
        lse_s = torch.logsumexp(s, -1)
        ce = (lse_s[valid] - s[rows, picked]).mean()  # nan without a labelled position, as F.cross_entropy
        tau = float(temperature)
        if tau == 1.0:
            st, tt, lse_st = s, t, lse_s
        else:
            st, tt = s / tau, t / tau
            lse_st = torch.logsumexp(st, -1)
        lse_tt = torch.logsumexp(tt, -1)
        p_t = torch.exp(tt - lse_tt[:, None])
        # sum_v p_t (log p_t - log p_s) = <p_t, t> - <p_t, s> - lse_t + lse_s, since sum_v p_t = 1
        kl_rows = torch.linalg.vecdot(p_t, tt) - torch.linalg.vecdot(p_t, st) - lse_tt + lse_st
        kl = kl_rows.mean() * tau**2
        total = alpha * kl if ce_weight == 0 else ce_weight * ce + alpha * kl
        grad = None
        if ctx.needs_input_grad[0]:
            kl_scale = alpha * tau / n
            grad = torch.exp(st - lse_st[:, None])  # softmax(s / tau)
            if ce_weight != 0 and n_lab:
                ce_scale = ce_weight / n_lab
                if tau == 1.0:
                    grad.mul_(kl_scale + ce_scale * valid.to(grad.dtype)[:, None])
                else:
                    grad.mul_(kl_scale).add_(torch.exp(s - lse_s[:, None]) * (ce_scale * valid.to(grad.dtype))[:, None])
                grad[rows, picked] -= ce_scale
            else:
                grad.mul_(kl_scale)
            grad.sub_(p_t, alpha=kl_scale)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)  # reported, not trained through: no grad flows back from them
        return total, ce, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    ce_weight: float = 1.0,
) -> DistillationLoss:
    """ce_weight * CE(student, labels) + alpha * per-token KL(teacher || student) (see the module
    docstring); ``ce_weight=0`` is pure distillation (the CE is still reported).

    ``labels`` [B, T] are aligned with the logits [B, T, V] (use ``next_token_labels``); the KL
    is taken at every position, the CE at labelled ones. Only the student is differentiated (the
    teacher's logits come from a forward under ``torch.no_grad``); computed in float32 at least,
    with the gradient in closed form (``_FusedDistillation``)."""
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' leading dims "
            f"{tuple(student_logits.shape[:-1])}; build them with next_token_labels(input_ids)."
        )
    _check_logits(teacher_logits, student_logits, temperature)
    if teacher_logits.requires_grad:
        raise ValueError("distillation_loss differentiates the student only: compute the teacher's "
                         "logits under torch.no_grad() (or pass them detached).")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab = student_logits.shape[-1]
    total, ce, kl = _FusedDistillation.apply(
        student_logits.to(dtype).reshape(-1, vocab), teacher_logits.to(dtype).reshape(-1, vocab),
        labels.reshape(-1), float(alpha), float(temperature), float(ce_weight), ignore_index)
    return DistillationLoss(total=total, ce=ce, kl=kl)


def matrix_mixing_loss(a_teacher: torch.Tensor, a_student: torch.Tensor, kind: str = "frobenius") -> torch.Tensor:
    """One layer's matrix-mixing distance between [B, H, T, T] maps (module docstring)."""
    if a_teacher.shape != a_student.shape or a_teacher.dim() != 4:
        raise ValueError(
            f"teacher map {tuple(a_teacher.shape)} and student map {tuple(a_student.shape)} must both "
            "be [B, H, T, T] with the teacher's head count (the converter keeps it)."
        )
    # float32 at least: bf16 maps lose the small differences the loss is made of
    dtype = torch.promote_types(a_student.dtype, torch.float32)
    diff = a_teacher.to(dtype) - a_student.to(dtype)
    if kind == "frobenius":
        return torch.linalg.matrix_norm(diff, ord="fro").sum(1).mean()
    if kind == "mse":
        return diff.pow(2).mean()
    raise ValueError(f"unknown matrix mixing loss {kind!r}; choose one of {MATRIX_MIXING_KINDS}.")


def hidden_loss(h_teacher: torch.Tensor, h_student: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """One layer's hidden-to-hidden distance between [B, T, D] states (module docstring)."""
    if h_teacher.shape != h_student.shape:
        raise ValueError(
            f"teacher hidden {tuple(h_teacher.shape)} and student hidden {tuple(h_student.shape)} differ."
        )
    dtype = torch.promote_types(h_student.dtype, torch.float32)
    diff = h_teacher.to(dtype) - h_student.to(dtype)
    if kind == "l2":
        return torch.linalg.vector_norm(diff, dim=-1).mean()
    if kind == "mse":
        return diff.pow(2).mean()
    raise ValueError(f"unknown hidden-to-hidden loss {kind!r}; choose one of {HIDDEN_KINDS}.")
