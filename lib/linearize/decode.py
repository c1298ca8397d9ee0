"""Optional compiled decode step for linearized students (issue 14, "decode").

A student's single-token step on the CPU is dominated by per-op cost (Python, dispatch, and an
OpenMP fork/join for every parallel op), not by its arithmetic: about 280-330 aten calls per
layer against the teacher's 196. ``compile_decode(model)`` compiles one decoder layer's
single-token step (input norm, mixer in recurrent form, residuals, MLP) with torch.compile
(inductor: C++/OpenMP kernels built with gcc) as one graph that every layer shares, so a step
runs a few fused kernels and the weight GEMVs per layer.

It is opt-in, and it never falls back quietly:
* ``fullgraph=True``: a graph break is an error, not a silent partial compile;
* ``fail_on_recompile_limit_hit``: past the recompile limit (raised to 32) dynamo raises
  instead of running the step uncompiled (new batch sizes, dtypes or mixers recompile);
* a prompt (several tokens) and the first token of a fresh cache take the eager path, which
  is the same code (``decoder_layer_step``) run uncompiled.

The first compiled step pays the compilation (tens of seconds on 2 loaded cores; inductor
caches the result on disk for later processes): ``benchmarks/decode_levers.py`` measures it and
whether the compiled step is faster on this machine, which is what decides whether to use it.
"""
from __future__ import annotations

import torch


def decoder_layer_step(layer, hidden_states, position_embeddings, state):
    """One ``LinearizedDecoderLayer`` on a single token with the mixer's recurrent step: a pure
    function of its inputs (hidden [B, 1, hidden], the layer's state dict) -> (hidden, new state),
    exactly what ``LinearizedDecoderLayer.forward`` computes with a cache for one token."""
    residual = hidden_states
    x = layer.input_layernorm(hidden_states)
    y, new_state = layer.self_attn(x, position_embeddings=position_embeddings, state=state, mode="recurrent")
    hidden_states = residual + y
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states)), new_state


def decoder_body_step(layers, hidden_states, position_embeddings, states):
    """Every decoder layer on a single token, in order: (hidden, [state per layer]) ->
    (hidden, [new state per layer]). Compiled as one graph (``scope="model"``), the step has no
    Python or dispatch between layers, and inductor sees all 30 layers' small kernels at once."""
    new_states = []
    for layer, state in zip(layers, states):
        hidden_states, state = decoder_layer_step(layer, hidden_states, position_embeddings, state)
        new_states.append(state)
    return hidden_states, new_states


SCOPES = ("layer", "model")
# The ways a benchmark can ask for a compiled decode step, by name: each is compile_decode's
# (scope, freeze).
COMPILED_STEPS = {"layer": ("layer", False), "model": ("model", False), "frozen": ("model", True)}


def compile_decode(model, kernel_threads: int | None = 1, scope: str = "layer", freeze: bool = False,
                   **compile_kwargs):
    """Make ``model`` (a ``LinearizedLlamaForCausalLM``) take a compiled single-token step.

    ``kernel_threads``: OpenMP threads inductor's generated C++ kernels use (None: torch's
    intra-op threads). The default 1 keeps the small fused state/elementwise kernels off the
    thread pool (no fork/join per kernel) while the weight GEMVs, which inductor leaves to the
    BLAS, keep torch's threads: at 2 threads on the loaded 2-core machine (load 5-6), context 128,
    it gave 0.75x / 0.88x the teacher's step (deltanet / gla) against 0.62x / 0.71x with None
    and 0.69x / 0.59x eager (benchmarks/decode_levers.py).

    ``scope``: "layer" compiles one layer's step, shared by every layer (one small graph per
    mixer class, compiled in seconds); "model" compiles the whole stack of layers as one graph
    (``decoder_body_step``; compiling takes about as many times longer as there are layers).

    ``freeze``: inductor's freezing (``scope="model"`` only): the weights become constants of the
    compiled graph, which lets inductor prepack the linear layers for oneDNN. The compiled step
    then no longer sees later changes to the weights (compile again after training), and it runs
    only without autograd (``torch.no_grad`` or ``inference_mode``; a step with grad enabled is
    refused by inductor, not run unfrozen).

    Returns the model; ``uncompile_decode`` undoes it."""
    from .modeling import LinearizedLlamaForCausalLM

    if not isinstance(model, LinearizedLlamaForCausalLM):
        raise TypeError(f"compile_decode takes a LinearizedLlamaForCausalLM, got {type(model).__name__}; "
                        "the teacher decodes through transformers (its own torch.compile support)")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if freeze and scope != "model":
        raise ValueError("freeze=True needs scope='model': frozen weights are constants of one graph, "
                         "so a layer step shared by every layer cannot hold them")
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    dynamo_config.fail_on_recompile_limit_hit = True
    # one graph per mixer class and state layout (a prefill's state and a step's may differ in
    # strides): several students in one process (the speed benchmark) pass dynamo's default of 8
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    options = dict(compile_kwargs.pop("options", {}) or {})
    if kernel_threads is not None:
        if kernel_threads < 1:
            raise ValueError(f"kernel_threads must be >= 1 (or None), got {kernel_threads}")
        if not hasattr(inductor_config.cpp, "threads"):
            raise RuntimeError("this torch's inductor has no cpp.threads option; pass kernel_threads=None")
        options["cpp.threads"] = kernel_threads
    if freeze:
        options["freezing"] = True
    uncompile_decode(model)
    if scope == "model":
        model.model.compiled_decode_body = torch.compile(decoder_body_step, fullgraph=True, dynamic=False,
                                                         options=options or None, **compile_kwargs)
        return model
    step = torch.compile(decoder_layer_step, fullgraph=True, dynamic=False, options=options or None,
                         **compile_kwargs)
    for layer in model.model.layers:
        layer.compiled_decode_step = step
    return model


def uncompile_decode(model):
    """Back to the eager step (the compiled code stays in torch's caches)."""
    model.model.__dict__.pop("compiled_decode_body", None)
    for layer in model.model.layers:
        layer.__dict__.pop("compiled_decode_step", None)
    return model
