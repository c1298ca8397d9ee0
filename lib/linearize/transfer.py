"""Attention-output transfer: a layer-local stage that regresses each student mixer onto the
teacher's attention output (an extension, not part of the source study; "stage 0").

Why. The paper's stage 1 (matrix mixing) materialises T x T maps per head and layer, and
stage 2 (hidden-to-hidden) back-propagates through the whole decoder layer, MLP included.
Both are costly per token on a CPU, and neither targets directly what the rest of the network
reads: the attention block's output. LoLCATs ("attention transfer") and the authors' later
code regress the new mixer's *output* onto the teacher's, with every layer fed the teacher's
own layer input from one teacher forward. That needs no T x T map and no MLP backward.

What. For one batch, the teacher runs once, layer by layer (``teacher.iter_layers``, no
grad). For layer l with teacher residual input h_l, both attention blocks see the same normed
input x_l = RMSNorm_l(h_l) (the student's norm is the copied teacher norm and stays frozen):

    target "output": y_T = teacher o_proj output,   y_S = student mixer output (after o_proj)
    target "heads":  y_T = teacher o_proj input,    y_S = student o_proj input
                     (per-head outputs [B, T, H * Dv] before the output projection, as LoLCATs)

    loss_l = ||y_S - y_T||^2 / ||y_T||^2     (relative squared error over the batch)

The relative form weighs every layer equally whatever the scale of its residual writes (the
teacher's attention outputs differ by orders of magnitude across depth); the stage loss is the
sum over layers, each layer's term back-propagated at once so only one layer's graph exists.

What trains (``at_train``): "mixers" (every mixer parameter), "gates" (mixer parameters other
than the q/k/v/o projections: feature maps, gates, decays, norms, convolutions), or "lora"
(the gates set plus LoRA adapters on q/k/v/o through ``peft``, merged back into plain weights
when the stage ends so the saved student has the converted model's keys).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

AT_TARGETS = ("output", "heads")
AT_TRAIN = ("mixers", "gates", "lora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def relative_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / ||target||^2 over all elements (float32 accumulation)."""
    pred, target = pred.float(), target.float()
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def _is_projection(name: str) -> bool:
    """A parameter of one of the mixer's q/k/v/o projections (plain or peft-wrapped)."""
    parts = name.split(".")
    return any(p in PROJECTIONS for p in parts) and "lora_" not in name


def trainable_mask(name: str, at_train: str) -> bool:
    """Whether parameter ``name`` of the student trains in stage 0 under ``at_train``."""
    if ".self_attn." not in name:
        return False
    if at_train == "mixers":
        return "lora_" not in name
    if at_train == "gates":
        return not _is_projection(name) and "lora_" not in name
    if at_train == "lora":
        return "lora_" in name or not _is_projection(name)
    raise ValueError(f"at_train must be one of {AT_TRAIN}, got {at_train!r}.")


def add_lora(student: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Inject peft LoRA adapters (rank ``rank``) into every mixer's q/k/v/o projection in place.

    ``peft.inject_adapter_in_model`` keeps the model's class and module tree (only the wrapped
    Linear layers change), so the layer-local stage can keep calling ``layer.self_attn``.
    Adapters start at zero (peft's default B = 0): the student's function is unchanged."""
    from peft import LoraConfig, inject_adapter_in_model

    present = {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, nn.Linear)
               and ".self_attn." in n}
    targets = [p for p in PROJECTIONS if p in present]
    if not targets:
        raise ValueError("at_train='lora' found no q/k/v/o projections in the student's mixers.")
    # target_modules as a regex so only attention projections (not MLP layers) are wrapped
    pattern = r".*\.self_attn\.(" + "|".join(targets) + r")$"
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=pattern, bias="none")
    return inject_adapter_in_model(config, student)


@torch.no_grad()
def merge_lora(student: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer back into a plain ``nn.Linear`` holding W + scale * B A, so the
    student's state dict has the converted model's keys again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(student.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = student.get_submodule(parent_name) if parent_name else student
            setattr(parent, child, module.get_base_layer())
    return student


def has_lora(student: nn.Module) -> bool:
    return any("lora_" in n for n, _ in student.named_parameters())


def attention_transfer_step(student, teacher, ids, params, backward: Callable, autocast) -> tuple[torch.Tensor, list[float]]:
    """Stage 0 on one batch: per layer, backward of the relative attention-output error."""
    from .teacher import iter_layers

    target = params["at_target"]
    if target not in AT_TARGETS:
        raise ValueError(f"at_target must be one of {AT_TARGETS}, got {target!r}.")
    captured: dict[str, torch.Tensor] = {}
    t_layers, s_layers = teacher.model.layers, student.model.layers
    if target == "heads":
        hooks = [t.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, inp: captured.__setitem__("t", inp[0])) for t in t_layers]
        hooks += [s.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, inp: captured.__setitem__("s", inp[0])) for s in s_layers]
    else:
        hooks = [t.self_attn.o_proj.register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("t", out)) for t in t_layers]
    total, per_layer = 0.0, []
    try:
        with autocast():
            for trace in iter_layers(teacher, ids, with_attention=False):
                y_t = captured.pop("t")  # written by the teacher's layer inside iter_layers
                layer = s_layers[trace.index]
                with torch.no_grad():
                    x = layer.input_layernorm(trace.hidden_in)
                y_s, _ = layer.self_attn(x, position_embeddings=trace.position_embeddings, keep_state=False)
                if target == "heads":
                    y_s = captured.pop("s")
                loss = relative_sq_error(y_s, y_t.detach())
                backward(loss)
                per_layer.append(loss.item())
                total = total + loss.detach()
    finally:
        for h in hooks:
            h.remove()
    return total, per_layer
