"""Each loss against values worked out by hand on tensors small enough to check on paper."""
import math

import pytest
import torch
import torch.nn.functional as F

from linearize import losses

LN3 = math.log(3.0)


def _logits(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_next_token_labels_shift_and_ignore_last():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert losses.next_token_labels(ids).tolist() == [[6, 7, -100], [2, 3, -100]]


def test_kl_is_a_per_token_mean_not_batchmean():
    # Teacher uniform over 2 words: p_T = (1/2, 1/2).
    # Position 1: student logits (0, ln 3) -> p_S = (1/4, 3/4):
    #   KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    # Positions 2 and 3: student = teacher -> KL = 0.
    # Per-token mean over 3 positions: ln(4/3) / 6.  (batchmean over B=1 would give ln(4/3)/2.)
    teacher = _logits([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])[None]
    student = _logits([[0.0, LN3], [5.0, 5.0], [-2.0, -2.0]])[None]
    kl = losses.per_token_kl(teacher, student)
    assert kl.item() == pytest.approx(math.log(4 / 3) / 6, rel=1e-12)


def test_kl_temperature_scales_logits_and_multiplies_by_tau_squared():
    # tau = 2: student logits (0, 2 ln 3) / 2 = (0, ln 3) -> p_S = (1/4, 3/4); teacher uniform.
    # KL = 1/2 ln(4/3), times tau^2 = 4 -> 2 ln(4/3).
    teacher = _logits([[0.0, 0.0]])[None]
    student = _logits([[0.0, 2 * LN3]])[None]
    assert losses.per_token_kl(teacher, student, temperature=2.0).item() == pytest.approx(
        2 * math.log(4 / 3), rel=1e-12
    )


def test_distillation_loss_is_ce_plus_alpha_kl():
    # One sequence of 3 positions, vocab 2. Labels (next tokens): 1, 0, ignored.
    # Student p_S at pos 0 = (1/4, 3/4) -> CE = -ln(3/4); pos 1 student (0,0) -> CE = ln 2.
    # CE = mean over the 2 labelled positions = (ln(4/3) + ln 2) / 2.
    # Teacher uniform at positions 0 and 1, and at position 2 teacher (0, ln 3), student (0, 0):
    #   KL_2 = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = -1/4 ln 2 + 3/4 ln(3/2).
    # KL = (1/2 ln(4/3) + 0 + KL_2) / 3.
    student = _logits([[0.0, LN3], [0.0, 0.0], [0.0, 0.0]])[None]
    teacher = _logits([[0.0, 0.0], [0.0, 0.0], [0.0, LN3]])[None]
    labels = torch.tensor([[1, 0, -100]])
    ce = (math.log(4 / 3) + math.log(2)) / 2
    kl = (0.5 * math.log(4 / 3) - 0.25 * math.log(2) + 0.75 * math.log(1.5)) / 3
    out = losses.distillation_loss(student, teacher, labels, alpha=0.5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-12)
    assert out.kl.item() == pytest.approx(kl, rel=1e-12)
    assert out.total.item() == pytest.approx(ce + 0.5 * kl, rel=1e-12)


def test_distillation_loss_gradient_flows_to_student_only():
    student = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 2, 3, dtype=torch.float64)
    out = losses.distillation_loss(student, teacher, torch.tensor([[2, -100]]))
    out.total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_matrix_mixing_frobenius_sums_heads_and_averages_batch():
    # B=2, H=2, T=2. Differences: (b0,h0) has entries 3 and 4 -> ||.||_F = 5; (b0,h1) has a
    # single 1 -> 1; (b1,h0) is zero; (b1,h1) has 2,2,1 (upper entry stays 0) -> 3.
    # Sum over heads: b0 -> 6, b1 -> 3; mean over batch -> 4.5.
    # MSE: squares sum to 9+16+1+4+4+1 = 35 over 16 entries -> 35/16.
    teacher = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    student = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    teacher[0, 0, 0, 0], teacher[0, 0, 1, 0] = 3.0, 4.0
    student[0, 1, 1, 1] = 1.0
    teacher[1, 1, 0, 0], teacher[1, 1, 1, 0], student[1, 1, 1, 1] = 2.0, 2.0, -1.0
    teacher[1, 0] = student[1, 0] = torch.tensor([[0.7, 0.0], [0.2, 0.8]], dtype=torch.float64)
    assert losses.matrix_mixing_loss(teacher, student).item() == pytest.approx(4.5, rel=1e-12)
    assert losses.matrix_mixing_loss(teacher, student, kind="mse").item() == pytest.approx(35 / 16, rel=1e-12)


def test_hidden_loss_l2_is_mean_of_per_position_norms():
    # Differences per position: (3, 4) -> 5, (0, 0) -> 0, (1, 0) -> 1, (0, 2) -> 2: mean 2.
    # MSE: (9 + 16 + 1 + 4) / 8 = 30 / 8.
    teacher = torch.tensor([[[3.0, 4.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    student = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, -2.0]]], dtype=torch.float64)
    assert losses.hidden_loss(teacher, student).item() == pytest.approx(2.0, rel=1e-12)
    assert losses.hidden_loss(teacher, student, kind="mse").item() == pytest.approx(30 / 8, rel=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda: losses.matrix_mixing_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), kind="l1"),
        lambda: losses.matrix_mixing_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3)),
        lambda: losses.hidden_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), kind="cos"),
        lambda: losses.per_token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), temperature=0),
        lambda: losses.distillation_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 3).long()),
    ],
)
def test_bad_input_fails_clearly(call):
    with pytest.raises(ValueError):
        call()


def test_distillation_loss_ce_weight_zero_is_pure_kl():
    # One position, teacher uniform over 2 words, student p_S = (1/4, 3/4), label word 0:
    # KL = 1/2 ln(4/3) (see above), CE = -ln(1/4) = ln 4. ce_weight 0: total = alpha * KL;
    # ce_weight 0.5: total = 0.5 ln 4 + alpha KL. The CE is reported either way.
    teacher = _logits([[0.0, 0.0], [0.0, 0.0]])[None]
    student = _logits([[0.0, LN3], [0.0, LN3]])[None]
    labels = torch.tensor([[0, -100]])
    kl = 0.5 * math.log(4 / 3)  # both positions have the same KL: the per-token mean is the same
    pure = losses.distillation_loss(student, teacher, labels, alpha=2.0, ce_weight=0.0)
    assert pure.total.item() == pytest.approx(2.0 * kl, rel=1e-12)
    assert pure.ce.item() == pytest.approx(math.log(4), rel=1e-12)
    half = losses.distillation_loss(student, teacher, labels, alpha=2.0, ce_weight=0.5)
    assert half.total.item() == pytest.approx(0.5 * math.log(4) + 2.0 * kl, rel=1e-12)


def _reference_distillation(student, teacher, labels, alpha, temperature, ce_weight):
    """The loss as the module docstring writes it, by autograd in float64."""
    s, t = student.double(), teacher.double()
    ce = F.cross_entropy(s.flatten(0, -2), labels.flatten(), ignore_index=-100)
    log_p_t = F.log_softmax(t / temperature, -1)
    log_p_s = F.log_softmax(s / temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2
    return ce_weight * ce + alpha * kl, ce, kl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_distillation_loss_and_gradient_match_the_float64_formula(temperature, ce_weight, dtype):
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 5, 37, generator=g)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(2, 5, 37, generator=g)).to(dtype)
    labels = torch.randint(0, 37, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    out = losses.distillation_loss(student, teacher, labels, alpha=0.7, temperature=temperature, ce_weight=ce_weight)
    ref_student = student.detach().double().requires_grad_(True)
    ref_total, ref_ce, ref_kl = _reference_distillation(ref_student, teacher, labels, 0.7, temperature, ce_weight)
    (out.total * 3.0).backward()  # a non-unit upstream gradient
    (ref_total * 3.0).backward()
    for got, want in ((out.total, ref_total), (out.ce, ref_ce), (out.kl, ref_kl)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert student.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: the gradient is rounded to 8 bits
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=tol, atol=tol)


def test_distillation_loss_refuses_a_teacher_that_needs_gradients():
    teacher = torch.zeros(1, 2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="no_grad"):
        losses.distillation_loss(torch.zeros(1, 2, 3), teacher, torch.tensor([[1, -100]]))
