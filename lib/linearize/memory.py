"""Bytes: of weights, of a teacher's KV cache and a student's generation state, and of the process.

The one home of state byte counting. Two counts, because a state tensor may be a view:

* :func:`compact_bytes`: the elements of every tensor (numel x element size), what the state
  holds by its shapes (``MixerCache.nbytes`` is this count);
* :func:`tensor_bytes`: the storage every distinct tensor keeps alive, each storage once, what
  the state costs in memory. The two differ exactly when a state tensor is a slice of a larger
  buffer, which then stays resident (worth fixing in the mixer).

:func:`generation_state_bytes` extends the compact count of a student's state to any context
length, and :func:`kv_cache_bytes` is the formula for a Llama KV cache that the benchmark's
measured teacher cache is checked against. The process helpers read and reset the peak
resident set size, so that the benchmark counts decoding, not loading. :func:`weights_digest`
names a model by the bytes of its weights.

torch is imported inside the functions: the benchmark's parent process and its CSV/table
commands need none of it.
"""
from __future__ import annotations

import gc
import sys
from typing import Any, Iterator

MIB = 2**20


# ---------------------------------------------------------------------------------------
# Tensors: weights, caches and states
# ---------------------------------------------------------------------------------------
def kv_cache_bytes(config, tokens: int, batch: int = 1, bytes_per_elem: int = 4) -> int:
    """Bytes of a Llama KV cache holding ``tokens`` positions: K and V, per layer, per KV head.

    2 * layers * kv_heads * head_dim * tokens * bytes_per_elem * batch.
    """
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_elem * batch


def iter_tensors(state: Any) -> Iterator:
    """Every tensor of a (possibly nested) state of dicts, lists and tuples, in order."""
    import torch

    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from iter_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from iter_tensors(value)


def compact_bytes(obj: Any) -> int:
    """Bytes of the elements of every tensor in ``obj`` (numel x element size), ignoring the
    storage a view keeps alive. Differs from ``tensor_bytes`` exactly when some state tensor is
    a slice of a larger buffer, which then stays resident (worth fixing in the mixer)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def tensor_bytes(obj: Any) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, sequences, a transformers
    ``Cache`` with ``layers``, or any object's attributes), each storage counted once."""
    import torch

    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr() if x.numel() else id(x)
            if key not in seen:
                seen.add(key)
                # count the storage, not the view: a view of a big buffer still holds all of it
                total += x.untyped_storage().nbytes()
            return
        if x is None or isinstance(x, (int, float, str, bool, bytes, torch.dtype, torch.device)):
            return
        if id(x) in visited:
            return
        visited.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return total


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, tied weights counted once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def generation_state_bytes(model, batch_size: int, context_len: int) -> int:
    """Bytes the generation state (``MixerCache``) of a student holds after ``context_len`` tokens.

    Measured, not modelled: the student consumes 1, 2 and 3 tokens and the real state tensors
    are counted. Every mixer state is affine in the number of tokens (constant for recurrent
    mixers, one key/value row per token for softmax); the three points check that before the
    line is extended to ``context_len``.
    """
    import torch

    if context_len < 1 or batch_size < 1:
        raise ValueError("batch_size and context_len must be >= 1")
    device = next(model.parameters()).device
    sizes = []
    with torch.no_grad():
        for n in (1, 2, 3):
            ids = torch.zeros(batch_size, n, dtype=torch.long, device=device)
            cache = model(input_ids=ids, use_cache=True).cache
            sizes.append(cache.nbytes())
    step = sizes[1] - sizes[0]
    if sizes[2] - sizes[1] != step:
        raise RuntimeError(f"State size is not affine in the context length: {sizes} bytes after 1, 2, 3 tokens.")
    return sizes[0] + step * (context_len - 1)


# ---------------------------------------------------------------------------------------
# Process memory
# ---------------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so the reset high-water mark starts low."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reset mark is merely a bit higher
        pass


# glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them
# on free, so every training step's logits (4 x 128 x 49152 floats = 100 MB, several copies) are
# new pages that the kernel faults in and zeroes again. Never mmapping and never trimming keeps
# freed blocks for reuse: DeltaNet stage 3 at cpu-quick ran in 0.91x the wall time with half the
# system time and 4.5x fewer page faults, for 11% more peak memory (benchmarks/malloc_env.py).
# The environment form (read by glibc at start-up) is what the runner gives its notebook kernels.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Set :data:`MALLOC_ENV`'s policy in this running process with glibc's ``mallopt``, for entry
    points that no runner started (a notebook run by hand, ``benchmarks/recipe.py``). A setting
    the user made in the environment wins: then nothing changes. Returns whether it was set;
    False as well where the C library is not glibc (the allocator then keeps its own policy)."""
    import os

    if any(key in os.environ for key in MALLOC_ENV):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # mallopt's value is a C int: 2 GiB - 1 of free heap top before a trim is "never" here
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux only.

    Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS. Returns False where
    that is not possible; the peak then includes loading (``peak_rss_source`` says which)."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM where readable, else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return lifetime_peak_rss_bytes()


def lifetime_peak_rss_bytes() -> int:
    """Peak RSS over the whole process life (getrusage is not affected by clear_refs)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def weights_digest(model) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes and bytes): the same
    weights give the same digest, any changed weight another one. About a second for 135M
    float32 parameters. Names the request cache of an evaluation and the teacher's reused
    outputs (``teacher.TeacherOutputs``)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()
