"""The student as a Hugging Face model: a Llama whose attention blocks are token mixers.

Why ~490 lines in one module: it follows transformers' layout of one ``modeling_*.py`` per model
(config, cache, layers, model, LM head), to be read side by side with ``modeling_llama.py``; the
state's byte counting lives in :mod:`linearize.memory`.

``LinearizedLlamaForCausalLM`` keeps Llama's module names (``model.embed_tokens``,
``model.layers[i].input_layernorm / self_attn / post_attention_layernorm / mlp``, ``model.norm``,
``model.rotary_emb``, ``lm_head``) and reuses transformers' own Llama norm, MLP and rotary
classes, so everything except ``self_attn`` is the teacher's code and can hold the teacher's
weights unchanged. ``self_attn`` is a ``linearize.mixers`` token mixer chosen by
``config.mixer``.

Importing this module registers the config and model with ``AutoConfig`` and
``AutoModelForCausalLM`` (model type ``linearized_llama``), so a saved student loads with
``AutoModelForCausalLM.from_pretrained(folder)`` after ``import linearize.modeling`` and works
with ``generate()`` and lm-eval's ``HFLM`` (pass ``backend="causal"`` there to skip its
model-type guess).

Generation runs on the mixers' own state (``MixerCache``): one dict of tensors per layer, of
constant size for the recurrent students and a growing key/value cache for the softmax
student. The mixers take no attention mask, so padded batches are refused (see
``_check_attention_mask``).
"""
from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .memory import compact_bytes, iter_tensors
from .memory import generation_state_bytes  # noqa: F401  (its home is linearize.memory; importable here as before)
from .mixers.base import MixerConfig, TokenMixer

MODEL_TYPE = "linearized_llama"


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------
@strict
class LinearizedLlamaConfig(LlamaConfig):
    """All of ``LlamaConfig`` (shapes, norms, RoPE in ``rope_parameters``) plus the mixer choice.

    ``mixer`` is a name in ``linearize.mixers.available()``; ``mixer_options`` is passed to the
    mixer unchanged (it must be JSON-serialisable: tuples come back as lists after a save);
    ``chunk_size`` and ``backend`` go to ``MixerConfig``. ``teacher`` and ``qkv_copy`` record
    where the student came from (set by ``linearize.convert``; informational only).
    """

    model_type = MODEL_TYPE

    mixer: str = "softmax"
    mixer_options: dict | None = None
    chunk_size: int = 64
    backend: str = "auto"
    teacher: str | None = None
    qkv_copy: bool | None = None

    def mixer_config(self) -> MixerConfig:
        return MixerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=float(self.rope_parameters["rope_theta"]),
            chunk_size=self.chunk_size,
            backend=self.backend,
            options=dict(self.mixer_options or {}),
        )


def mixer_class(name: str) -> type[TokenMixer]:
    """The registered mixer class for ``name`` (aliases such as ``llama`` included)."""
    from . import mixers

    try:
        return mixers.get(name)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"Unknown student mixer {name!r}. Available: {', '.join(mixers.available())}."
        ) from err


# ---------------------------------------------------------------------------------------
# Generation state
# ---------------------------------------------------------------------------------------
def _map_state(state, fn):
    """Apply ``fn`` to every tensor of a state, keeping its structure (for beam search etc.)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _map_state(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map_state(v, fn) for v in state)
    return state


class MixerStateLayer:
    """One layer's mixer state inside a ``MixerCache``.

    Implements the per-layer operations ``transformers.Cache`` delegates to (reset, reorder for
    beam search, repeat/select along the batch); all of them act on the batch dimension (0) of
    every state tensor, which is where ``TokenMixer.init_state`` puts it.
    """

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self):
        self.state: dict[str, Any] | None = None

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        first = next(iter_tensors(self.state), None)
        return -1 if first is None else first.shape[0]

    def nbytes(self) -> int:
        return compact_bytes(self.state)

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = _map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = _map_state(self.state, lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "A recurrent mixer state cannot be rolled back by tokens; assisted/speculative decoding "
                "is not supported for linearized students."
            )

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def __repr__(self):
        return f"MixerStateLayer(bytes={self.nbytes()})"


class MixerCache(Cache):
    """The generation state of a linearized student: per layer, its mixer's state dict.

    ``get_seq_length()`` counts the tokens consumed so far (needed for RoPE positions);
    ``nbytes()`` is the memory the state holds right now.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[MixerStateLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self):
        super().reset()
        self.seen_tokens = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def is_linear(self) -> list[bool]:
        # "Not linear attention" in transformers' sense (its LinearAttentionLayer keeps no token
        # count): generate() then trusts get_seq_length() and, when a used MixerCache is passed
        # back in, feeds only the tokens the state has not consumed yet.
        return [False] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return all(layer.is_initialized for layer in self.layers)

    def __repr__(self):
        return f"MixerCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------
def build_mixer(config: LinearizedLlamaConfig, layer_idx: int) -> TokenMixer:
    """Layer ``layer_idx``'s mixer, marked so that ``_init_weights`` leaves its own init alone."""
    mixer = mixer_class(config.mixer)(config.mixer_config(), layer_idx)
    for sub in mixer.modules():
        sub._linearize_in_mixer = True
    # Built for real (not on the meta device, as from_pretrained does): the buffers the
    # constructor computed are valid and _init_weights need not rebuild them.
    mixer._linearize_buffers_valid = not any(b.is_meta for b in mixer.buffers())
    return mixer


class LinearizedDecoderLayer(GradientCheckpointingLayer):
    """Llama's decoder layer with the attention block replaced by a token mixer."""

    def __init__(self, config: LinearizedLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = build_mixer(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: MixerCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        step = self.__dict__.get("compiled_decode_step")  # set by linearize.decode.compile_decode
        if step is not None and cache is not None and hidden_states.shape[1] == 1:
            slot = cache.layers[self.layer_idx]
            if slot.state is not None:  # a fresh cache's first token starts below (init_state)
                hidden_states, slot.state = step(self, hidden_states, position_embeddings, slot.state)
                return hidden_states
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        if cache is None:
            y, _ = self.self_attn(x, position_embeddings=position_embeddings, mode="chunk", keep_state=False)
        else:
            slot = cache.layers[self.layer_idx]
            # The first call starts from the mixer's empty state. Several tokens at once (a
            # prompt, or a continuation) take the chunked form from the carried state; a single
            # token takes the recurrent step.
            start = slot.state
            if start is None:
                start = self.self_attn.init_state(x.shape[0], x.device, x.dtype)
            mode = "chunk" if x.shape[1] > 1 else "recurrent"
            y, new_state = self.self_attn(x, position_embeddings=position_embeddings, state=start, mode=mode)
            if new_state is None:
                raise RuntimeError(
                    f"Mixer {self.self_attn.name!r} (layer {self.layer_idx}) returned no state from "
                    f"mode={mode!r} although it was given one; generation needs the final state."
                )
            slot.state = new_state
        hidden_states = residual + y
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LinearizedLlamaPreTrainedModel(PreTrainedModel):
    config: LinearizedLlamaConfig
    config_class = LinearizedLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LinearizedDecoderLayer"]

    def _init_weights(self, module):
        # Mixers initialise themselves in their constructors (gate biases, feature maps ...);
        # the generic Linear/Embedding init of transformers would overwrite that.
        if isinstance(module, TokenMixer):
            _restore_mixer_buffers(module)
            return
        if getattr(module, "_linearize_in_mixer", False):
            return
        super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # A DynamicCache stores keys/values; our layers keep mixer states (MixerCache),
        # which forward() creates when use_cache=True, as transformers' Mamba models do.
        return False


def _non_persistent_buffers(module: nn.Module) -> list[str]:
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
    ]


def _restore_mixer_buffers(mixer: TokenMixer) -> None:
    """Recompute a mixer's non-persistent buffers (constants its constructor derives from the
    config, e.g. ReBased's feature indices) when they are not valid.

    ``from_pretrained`` builds the model on the meta device and then gives non-persistent
    buffers uninitialised memory (they are not in the checkpoint), expecting ``_init_weights``
    to fill them. A mixer built here on the CPU, in the model's dtype, supplies the values.
    """
    names = _non_persistent_buffers(mixer)
    if not names or getattr(mixer, "_linearize_buffers_valid", False):
        return
    dtype = next((p.dtype for p in mixer.parameters() if p.is_floating_point()), torch.get_default_dtype())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cpu"):
            fresh = type(mixer)(mixer.config, mixer.layer_idx)
    finally:
        torch.set_default_dtype(previous)
    for name in names:
        mixer.get_buffer(name).copy_(fresh.get_buffer(name))
    mixer._linearize_buffers_valid = True


class LinearizedLlamaModel(LinearizedLlamaPreTrainedModel):
    def __init__(self, config: LinearizedLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LinearizedDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MixerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        output_hidden_states = bool(output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        # Unlike Llama, a plain forward does not build a cache unless asked (use_cache=True, as
        # generate() does): training and scoring then never pay for final states.
        use_cache = bool(use_cache) or cache is not None
        if self.gradient_checkpointing and self.training and use_cache:
            raise ValueError("use_cache=True is incompatible with gradient checkpointing in training.")
        if cache is not None and not isinstance(cache, MixerCache):
            raise TypeError(
                f"Linearized students keep mixer states, not {type(cache).__name__}; pass a MixerCache "
                "(or nothing and use_cache=True)."
            )
        if use_cache and cache is None:
            cache = MixerCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        _check_attention_mask(attention_mask, carries_state=use_cache)

        if position_ids is None:
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        all_hidden = (hidden_states,) if output_hidden_states else None
        body = self.__dict__.get("compiled_decode_body")  # set by linearize.decode.compile_decode(scope="model")
        if (body is not None and cache is not None and hidden_states.shape[1] == 1 and not output_hidden_states
                and all(slot.state is not None for slot in cache.layers)):
            hidden_states, states = body(self.layers, hidden_states, position_embeddings,
                                         [slot.state for slot in cache.layers])
            for slot, state in zip(cache.layers, states):
                slot.state = state
        else:
            for layer in self.layers:
                hidden_states = layer(hidden_states, position_embeddings=position_embeddings, cache=cache)
                if output_hidden_states:
                    all_hidden += (hidden_states,)
        if cache is not None:
            cache.seen_tokens += inputs_embeds.shape[1]
        hidden_states = self.norm(hidden_states)

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden)


def _check_attention_mask(attention_mask: torch.Tensor | None, carries_state: bool) -> None:
    """Refuse masks the mixers cannot honour.

    The mixers take no attention mask: every token mixes with all tokens before it. So
    * a zero before a one in a row (left padding, or holes) would let the real tokens read
      padding: refused always;
    * trailing zeros (right padding) are harmless when scoring a causal model (real positions
      never see later ones), so they pass in a plain forward; when a state is carried
      (use_cache, i.e. generation) later tokens would follow the padding, so any zero is refused.
    """
    if attention_mask is None:
        return
    if attention_mask.dim() != 2:
        raise ValueError(
            "Linearized students take a 2-D [batch, length] attention mask of ones (or trailing zeros)"
            f"; got shape {tuple(attention_mask.shape)}."
        )
    mask = attention_mask.bool()
    if mask.all():
        return
    if carries_state:
        raise ValueError(
            "Batched generation with padding is not supported by linearized students: their mixers "
            "carry a state without an attention mask, so padding tokens would enter it. Generate "
            "with batch size 1 or equal-length prompts (no padding)."
        )
    # cummin along the row stays 1 only while no zero has been seen: a later 1 means left padding.
    left_aligned = mask.int().cummin(dim=1).values.bool()
    if (mask & ~left_aligned).any():
        raise ValueError(
            "Left padding (or a zero before a one) in attention_mask is not supported by linearized "
            "students: their mixers take no mask, so real tokens would mix with padding. Use right "
            "padding (tokenizer.padding_side = 'right') for scoring, batch size 1 for generation."
        )


class LinearizedLlamaForCausalLM(LinearizedLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearizedLlamaConfig):
        super().__init__(config)
        self.model = LinearizedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def mixers(self) -> list[TokenMixer]:
        return [layer.self_attn for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MixerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            rest = tuple(v for v in (out.cache, out.hidden_states) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


AutoConfig.register(MODEL_TYPE, LinearizedLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizedLlamaConfig, LinearizedLlamaForCausalLM, exist_ok=True)
