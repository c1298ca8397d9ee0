"""Teacher -> student: a Llama-architecture teacher becomes a ``LinearizedLlamaForCausalLM``.

What is copied, bit for bit (same module names on both sides):
  model.embed_tokens, every layer's input_layernorm / post_attention_layernorm / mlp,
  model.norm and lm_head (tied to the embeddings exactly when the teacher ties them).
What is replaced: every ``self_attn`` by the student's token mixer, built from the teacher's
shapes (hidden size, H query heads, H_kv key/value heads, head dim, RoPE theta).
What QKV copying adds (``qkv_copy=True``): each mixer's ``copy_from_attention`` copies the
teacher's q/k/v/o projections into the ones it has (docs/study.md, Table 1: HGRN2 and MetaLA
have no key, so their k_proj is skipped and reported).

Head mapping under grouped-query attention (SmolLM2-135M: H = 9, H_kv = 3, group g = H / H_kv
= 3): query head h reads key/value head h // g, exactly as Llama's ``repeat_kv`` does. The
teacher's q_proj rows [h*d, (h+1)*d) are query head h; its k_proj/v_proj rows
[j*d, (j+1)*d) are KV head j. A mixer that keeps H_kv key/value heads copies k_proj/v_proj
as they are and repeats heads at run time; a mixer with H key heads gets, for head h, the
teacher's rows of KV head h // g. Either way student head h starts as teacher head h, so
stage 1 compares like with like.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .modeling import LinearizedLlamaConfig, LinearizedLlamaForCausalLM, build_mixer
from .paper import PAPER_PARAMS_M, PAPER_REFERENCE_M  # noqa: F401  (re-exported: they used to live here)

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_DESCRIPTION = (
    "Llama-architecture causal LMs (transformers LlamaForCausalLM, model_type 'llama': Llama 1-3, "
    "SmolLM/SmolLM2, TinyLlama, ...)"
)

class ConversionError(ValueError):
    """A teacher or student choice the converter cannot turn into a student."""


def check_teacher(teacher: nn.Module) -> None:
    """Raise ``ConversionError`` unless ``teacher`` is a Llama-shaped causal LM."""
    config = getattr(teacher, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"Cannot convert a {type(teacher).__name__} (model_type {model_type!r}): supported teachers "
            f"are {SUPPORTED_DESCRIPTION}."
        )
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    if not layers or not all(hasattr(layer, n) for layer in layers for n in needed):
        raise ConversionError(
            f"{type(teacher).__name__} has model_type 'llama' but not Llama's module layout "
            f"(model.layers[i].{{{', '.join(needed)}}}); supported teachers are {SUPPORTED_DESCRIPTION}."
        )
    if getattr(config, "num_attention_heads") % getattr(config, "num_key_value_heads"):
        raise ConversionError("num_attention_heads must be a multiple of num_key_value_heads.")


def resolve_student(arch: str) -> str:
    """Canonical mixer name for ``arch`` (aliases such as 'llama' -> 'softmax')."""
    from . import mixers

    try:
        return mixers.spec(arch).name
    except KeyError as err:
        raise ConversionError(
            f"Unknown student {arch!r}. Valid students: {', '.join(mixers.available())} "
            "(alias 'llama' = softmax, 'mlstm' = xlstm)."
        ) from err


def student_config(
    teacher_config,
    arch: str,
    mixer_options: dict | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
    qkv_copy: bool | None = None,
) -> LinearizedLlamaConfig:
    """The student's config: every Llama field of the teacher plus the mixer choice.

    ``arch`` may name a hybrid (beyond the paper), e.g. 'deltanet+w64': the student with a
    64-token softmax window, the same as ``mixer_options={'hybrid_window': 64}``."""
    from .mixers import hybrid

    try:
        arch, named = hybrid.parse_name(arch)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    mixer_options = {**(mixer_options or {}), **named}
    fields = teacher_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path",
                "quantization_config", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return LinearizedLlamaConfig(
        **fields,
        mixer=resolve_student(arch),
        mixer_options=dict(mixer_options or {}),
        chunk_size=chunk_size,
        backend=backend,
        teacher=getattr(teacher_config, "_name_or_path", None) or None,
        qkv_copy=qkv_copy,
    )


@torch.no_grad()
def convert(
    teacher: nn.Module,
    arch: str,
    qkv_copy: bool = True,
    mixer_options: dict | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> LinearizedLlamaForCausalLM:
    """Build the ``arch`` student of ``teacher`` (same device and dtype), copy what it shares.

    Returns the student in eval mode with gradients enabled. Its ``conversion_notes`` lists
    ``(layer, note)`` pairs from the mixers (what was copied, what was skipped and why); they
    are also logged, and a warning is raised when QKV copying is asked of a mixer without a
    key projection (HGRN2, MetaLA: only q/v/o are copied).
    """
    check_teacher(teacher)
    config = student_config(teacher.config, arch, mixer_options, chunk_size, backend, qkv_copy)
    first = next(teacher.parameters())
    student = _build_student(config, first.dtype, first.device)
    shared = _copy_shared(teacher, student)
    notes: list[tuple[int, str]] = []
    for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.model.layers)):
        notes += [(i, n) for n in s_layer.self_attn.copy_from_attention(t_layer.self_attn, qkv_copy=qkv_copy)]

    mixer = student.mixers[0]
    if qkv_copy and not type(mixer).has_key:
        message = (
            f"qkv_copy=True but the {config.mixer!r} mixer has no key projection: q/v/o are copied where "
            "it has them, the teacher's k_proj is not used."
        )
        if getattr(mixer, "hybrid", None) is not None:
            message = message[:-1] + " by the mixer (its hybrid softmax window keeps a copy of it)."
        warnings.warn(message, stacklevel=2)
        notes.append((-1, message))
    student.conversion_notes = notes
    logger.info("converted %s -> %s: copied %d shared tensors", config.teacher, config.mixer, shared)
    for line in summarize_notes(notes):
        logger.info("  %s", line)
    return student.eval()


def _build_student(config: LinearizedLlamaConfig, dtype: torch.dtype, device) -> LinearizedLlamaForCausalLM:
    """The student with real mixers and *uninitialised* memory everywhere else.

    Everything outside the mixers is about to be overwritten by the teacher's tensors, so it is
    built on the meta device and only given memory (random init of the ~100M shared parameters
    of SmolLM2-135M took 3 of the 3.5 s a conversion cost). The mixers and the rotary
    embedding's frequencies are then built for real, in the teacher's dtype and device.
    """
    with torch.device("meta"):
        student = LinearizedLlamaForCausalLM._from_config(config, dtype=dtype)
    student.to_empty(device=device)
    student.tie_weights()  # to_empty gives tied parameters separate memory; tie them again
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            for i, layer in enumerate(student.model.layers):
                layer.self_attn = build_mixer(config, i)
            student.model.rotary_emb = LlamaRotaryEmbedding(config)
    finally:
        torch.set_default_dtype(previous)
    stray = [n for n, _ in student.named_buffers() if ".self_attn." not in n and not n.startswith("model.rotary_emb.")]
    if stray:
        raise ConversionError(f"Buffers outside the mixers would stay uninitialised: {stray}")
    return student


def _copy_shared(teacher: nn.Module, student: LinearizedLlamaForCausalLM) -> int:
    """Copy every student parameter outside the mixers from the teacher tensor of the same name."""
    source = dict(teacher.named_parameters())
    count = 0
    for name, param in student.named_parameters():  # tied weights appear once
        if ".self_attn." in name:
            continue
        if name not in source:
            raise ConversionError(f"The teacher has no parameter {name!r} to copy into the student.")
        if source[name].shape != param.shape:
            raise ConversionError(f"{name}: teacher {tuple(source[name].shape)} vs student {tuple(param.shape)}.")
        param.copy_(source[name])
        count += 1
    if student.config.tie_word_embeddings and student.lm_head.weight is not student.model.embed_tokens.weight:
        raise ConversionError("The teacher ties its embeddings but the student's lm_head is not tied.")
    return count


def summarize_notes(notes: list[tuple[int, str]]) -> list[str]:
    """Group identical notes over layers: 'layers 0-29: q_proj: copied (576, 576)'."""
    by_note: dict[str, list[int]] = {}
    for layer, note in notes:
        by_note.setdefault(note, []).append(layer)
    lines = []
    for note, layers in by_note.items():
        if layers == [-1]:
            lines.append(note)
        elif len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
            lines.append(f"layers {layers[0]}-{layers[-1]}: {note}")
        else:
            lines.append(f"layers {','.join(map(str, layers))}: {note}")
    return lines


# ---------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------
@dataclass
class ParamRow:
    student: str
    params: int  # whole student (tied weights counted once)
    mixer_params: int  # all layers' token mixers
    growth: float  # params / teacher params
    paper_params_m: int | None  # the paper's student (teacher SmolLM-360M)
    paper_growth: float | None  # paper_params / 350M (the paper's Llama-Llama student)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def parameter_table(teacher: nn.Module, students: list[str] | None = None, mixer_options: dict | None = None):
    """Rows of parameter counts for each student built from ``teacher``'s shapes.

    Students are built on the meta device (shapes only, no memory, no weights copied), so the
    ten students of a 135M teacher take seconds. Returns ``(teacher_params, rows)``.
    """
    from . import mixers

    check_teacher(teacher)
    teacher_params = count_params(teacher)
    rows = []
    for name in students or mixers.available():
        config = student_config(teacher.config, name, mixer_options)
        with torch.device("meta"):
            student = LinearizedLlamaForCausalLM(config)
        total = count_params(student)
        mixer_total = sum(count_params(m) for m in student.mixers)
        paper = PAPER_PARAMS_M.get(config.mixer)
        rows.append(ParamRow(
            student=config.mixer,
            params=total,
            mixer_params=mixer_total,
            growth=total / teacher_params,
            paper_params_m=paper,
            paper_growth=None if paper is None else paper / PAPER_REFERENCE_M,
        ))
    return teacher_params, rows
