"""The hybrid option (beyond the paper): an exact softmax window beside any student's linear branch.

Switched on for every subquadratic mixer by one option, ``hybrid_window`` = w > 0 (params key of
the same name, or ``mixer_options``); ``hybrid_sinks`` = s (default 4) and ``hybrid_mix`` (the
window branch's starting weight, default 0.99) complete it. The paper's students have no window:
every hybrid is labelled "beyond the paper" where it is reported.

The window branch is exact causal softmax attention restricted, for the query at position i, to
the keys j <= i with j > i - w (the last w tokens, i itself included) or j < s (the first s
positions, the "attention sinks", always attended). It reads the teacher's projections: the
mixer's own q_proj / k_proj / v_proj applied to the layer input (copied from the teacher by
``qkv_copy``), RoPE as the teacher, 1/sqrt(d) scale. A mixer without one of those projections
(HGRN2, MetaLA: no key) gets a window-only copy here (``hybrid.k_proj``) that ``qkv_copy`` fills
from the teacher too. Sharing the projections, as Liger does, keeps the parameter count of the
student; with w >= the sequence length the branch *is* the teacher's attention.

How the two branches combine. LoLCATs puts the window's exp-scores and the linear feature-map
scores under one normaliser; that only means something for a positive, normalised linear
attention (Hedgehog, ReBased). Most of our students have none (DeltaNet, GLA, Mamba2, mLSTM
and the others write signed, unnormalised kernels followed by an output norm and gate), so the
mix is instead a convex one per head, g_h = sigmoid(mix_logit_h), learned (or fixed with
``hybrid_learn_mix=False``), taken where the teacher's attention output lives: per head, just
before o_proj,

    y = o_proj( merge_h( g_h * window_h + (1 - g_h) * pre_h ) )

with pre = the student's output() without its o_proj (output norm, output gate ...). So g = 1
reproduces the teacher's attention block exactly when w >= T, and g = 0 is the plain student.
The starting g defaults to 0.99, close to the window: a fresh linear branch is far from the
teacher while a 64-token window with sinks is close to it, and the linear branch's output norm
makes it large next to the teacher's attention output. Measured at conversion
(benchmarks/hybrid_gap.py, SmolLM2-135M, w = 64, 256-token validation blocks): DeltaNet's KL to
the teacher is 6.96 at g = 0.9 (4 blocks), 0.100 at 0.99, 0.064 at 0.999 and 0.065 with the
window alone (1 block); GLA's 0.104 at 0.9 against 0.063 for the window (4 blocks), xLSTM's
5.20 at 0.9. Training then moves each head's gate.

The three forms (``linearize.mixers.linear`` calls these):
* chunk:     queries in blocks of ``chunk_size``; each block scores the sinks and only the keys
             its window reaches, so memory is O(T (w + s + block)), not O(T^2).
* recurrent: a constant-size window cache, a ring buffer of the last w keys/values (slot
             (j - s) mod w for position j >= s) plus the s sink keys/values and the count of
             tokens seen, beside the linear state. Keys are stored after RoPE with the
             teacher's H_kv heads, as a Llama KV cache, so the bytes are 2 (w + s) H_kv d.
* matrix:    the window's softmax map P [B, H, T, T] (zero outside the window and the sinks);
             ``mixing_matrix`` returns g P + (1 - g) A_linear. Its rows say how much token j
             feeds token i through either branch. ``core().o`` is the same mix of the two
             kernel outputs, g P v_win + (1 - g) A v, so ``core().o == mixing_matrix() @ core().v``
             exactly when both branches read the same values (every mixer without a value
             convolution); DeltaNet, Mamba2 and MetaLA convolve the linear branch's values, and
             there the identity holds branch by branch (``HybridWindow.parts``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .common import apply_rope, copy_linear_by_name, merge_heads, repeat_kv, split_heads

OPTION_KEYS = ("hybrid_window", "hybrid_sinks", "hybrid_mix", "hybrid_learn_mix")
DEFAULT_SINKS = 4
DEFAULT_MIX = 0.99
LABEL = "beyond the paper"
STATE_KEYS = ("win_k", "win_v", "win_sink_k", "win_sink_v", "win_pos")


@dataclass(frozen=True)
class HybridSettings:
    window: int
    sinks: int = DEFAULT_SINKS
    mix: float = DEFAULT_MIX
    learn_mix: bool = True


def settings(options: dict | None) -> HybridSettings | None:
    """The hybrid settings in a mixer's options, or None when ``hybrid_window`` is 0 / absent."""
    options = options or {}
    window = options.get("hybrid_window", 0) or 0
    if isinstance(window, bool) or int(window) != window or window < 0:
        raise ValueError(f"hybrid_window must be a whole number >= 0 (0 = no window), got {window!r}")
    if window == 0:
        return None
    sinks = options.get("hybrid_sinks", DEFAULT_SINKS)
    sinks = DEFAULT_SINKS if sinks is None else sinks
    if isinstance(sinks, bool) or int(sinks) != sinks or sinks < 0:
        raise ValueError(f"hybrid_sinks must be a whole number >= 0, got {sinks!r}")
    mix = options.get("hybrid_mix", DEFAULT_MIX)
    mix = DEFAULT_MIX if mix is None else float(mix)
    learn = bool(options.get("hybrid_learn_mix", True))
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"hybrid_mix (the window branch's starting weight) must lie in [0, 1], got {mix}")
    if learn and mix in (0.0, 1.0):
        raise ValueError(f"a learned mix starts from sigmoid(logit), so hybrid_mix must lie strictly between 0 "
                         f"and 1, got {mix}; set hybrid_learn_mix=False for a fixed mix of exactly {mix}")
    return HybridSettings(int(window), int(sinks), mix, learn)


def options_of(window: int, sinks: int | None = None, mix: float | None = None, learn: bool = True) -> dict:
    """The mixer options that switch the hybrid on (empty for window 0). ``learn=False`` (a fixed
    mix; with mix 1, the window alone) is the only case that writes ``hybrid_learn_mix``, so the
    options, and the stage identities made of them, of learned-mix runs are as they were."""
    if not window:
        return {}
    out = {"hybrid_window": int(window)}
    if sinks is not None:
        out["hybrid_sinks"] = int(sinks)
    if mix is not None:
        out["hybrid_mix"] = float(mix)
    if not learn:
        out["hybrid_learn_mix"] = False
    return out


_NAME = re.compile(r"(?P<arch>[a-z0-9_]+)\+w(?P<w>\d+)(?:s(?P<s>\d+))?")


def parse_name(name: str) -> tuple[str, dict]:
    """'deltanet+w64' -> ('deltanet', {'hybrid_window': 64}); 'gla+w64s2' adds 2 sinks; a plain
    name comes back with no options. The bench and the runner name hybrid students this way."""
    if "+" not in name:
        return name, {}
    m = _NAME.fullmatch(name)
    if not m or int(m["w"]) < 1:
        raise ValueError(f"cannot read the hybrid student name {name!r}: write <student>+w<window>[s<sinks>], "
                         "e.g. deltanet+w64 or gla+w64s4 (window >= 1)")
    return m["arch"], options_of(int(m["w"]), None if m["s"] is None else int(m["s"]))


def format_name(arch: str, options: dict | None) -> str:
    """The inverse of ``parse_name``: 'deltanet+w64' (sinks written only when not the default)."""
    st = settings(options)
    if st is None:
        return arch
    return f"{arch}+w{st.window}" + ("" if st.sinks == DEFAULT_SINKS else f"s{st.sinks}")


def is_hybrid(params_or_options: dict | None) -> bool:
    """Whether a run's params (top-level ``hybrid_window`` or inside ``mixer_options``) or a
    mixer's options describe a hybrid."""
    p = params_or_options or {}
    return bool(p.get("hybrid_window") or (p.get("mixer_options") or {}).get("hybrid_window"))


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    if scores.dtype in (torch.float16, torch.bfloat16):  # as sdpa: accumulate the softmax in fp32
        return scores.float().softmax(-1).to(scores.dtype)
    return scores.softmax(-1)


def _grouped(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H_kv, G, T, D]: query head h = kv * G + r reads KV head kv (Llama's repeat_kv)."""
    b, h, t, d = q.shape
    return q.view(b, h_kv, h // h_kv, t, d)


def window_attend(q, k_sink, v_sink, k_win, v_win, q_start: int, win_start: int, window: int, block: int):
    """Blocked causal softmax over the sinks and a sliding window.

    q [B, H, T, D] at absolute positions q_start + t; k_sink / v_sink [B, H_kv, ns, D] at
    positions 0 .. ns-1 (all < sinks); k_win / v_win [B, H_kv, nw, D] at the consecutive
    positions win_start .. win_start + nw - 1 (all >= sinks). Query i sees sink j when j <= i
    and window key j when i - window < j <= i."""
    b, h, t, d = q.shape
    h_kv, ns, nw = k_sink.shape[1], k_sink.shape[2], k_win.shape[2]
    scale = 1.0 / math.sqrt(d)
    ks, vs = k_sink.unsqueeze(2), v_sink.unsqueeze(2)  # [B, H_kv, 1, n, D]: broadcast over the group
    kw, vw = k_win.unsqueeze(2), v_win.unsqueeze(2)
    sink_pos = torch.arange(ns, device=q.device)
    outs = []
    for a in range(0, t, block):
        e = min(t, a + block)
        qb = _grouped(q[:, :, a:e], h_kv)
        qpos = torch.arange(q_start + a, q_start + e, device=q.device)[:, None]
        lo = max(0, q_start + a - window + 1 - win_start)
        hi = max(lo, min(nw, q_start + e - win_start))
        kpos = torch.arange(win_start + lo, win_start + hi, device=q.device)[None]
        s_sink = (qb @ ks.transpose(-1, -2)) * scale
        s_sink = s_sink.masked_fill(sink_pos[None] > qpos, float("-inf"))
        s_win = (qb @ kw[..., lo:hi, :].transpose(-1, -2)) * scale
        s_win = s_win.masked_fill((kpos > qpos) | (kpos <= qpos - window), float("-inf"))
        p = _softmax(torch.cat([s_sink, s_win], -1))
        o = p[..., :ns] @ vs + p[..., ns:] @ vw[..., lo:hi, :]
        outs.append(o.reshape(b, h, e - a, d))
    return torch.cat(outs, 2)


def window_matrix(q, k, sinks: int, window: int) -> torch.Tensor:
    """The materialised window map P [B, H, T, T] for a sequence from position 0 (dense: the
    form stage 1 and the explorer compare with the teacher's T x T attention)."""
    h, t, d = q.shape[1], q.shape[2], q.shape[3]
    scores = q @ repeat_kv(k, h).transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(t, device=q.device)[None]
    keep = (j <= i) & ((j < sinks) | (j > i - window))
    return _softmax(scores.masked_fill(~keep, float("-inf")))


class _CountingIdentity(nn.Module):
    """Stands in for o_proj while output() runs, and counts its calls (exactly one expected)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        return z


class HybridWindow(nn.Module):
    """The window branch and the mix of one hybrid mixer (held as ``mixer.hybrid``).

    It keeps no reference to its mixer (that would loop the module tree): each call takes the
    mixer, whose projections it reads."""

    def __init__(self, config, st: HybridSettings, own: tuple[str, ...] = ()):
        super().__init__()
        self.window, self.sinks, self.learn_mix = st.window, st.sinks, st.learn_mix
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.block = max(1, int(config.chunk_size))
        out = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads, "v_proj": config.num_kv_heads}
        self.own = tuple(own)
        for name in self.own:  # window-only copies of projections the mixer lacks
            setattr(self, name, nn.Linear(config.hidden_size, out[name] * config.head_dim, bias=False))
        with torch.no_grad():
            logit = torch.full((config.num_heads,), math.log(st.mix) - math.log1p(-st.mix) if 0 < st.mix < 1
                               else (math.inf if st.mix == 1 else -math.inf))
        if st.learn_mix:
            self.mix_logit = nn.Parameter(logit)
        else:
            self.register_buffer("mix_logit", logit)

    def extra_repr(self) -> str:
        own = f", own={list(self.own)}" if self.own else ""
        return f"window={self.window}, sinks={self.sinks}, learn_mix={self.learn_mix}{own} ({LABEL})"

    # ---- pieces ----------------------------------------------------------------------------
    def gate(self, dtype) -> torch.Tensor:
        """g [H], the window branch's weight per head."""
        logit = self.mix_logit
        if logit.dtype in (torch.float16, torch.bfloat16):
            logit = logit.float()
        return torch.sigmoid(logit).to(dtype)

    def mix(self, linear: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """(1 - g) linear + g window for head-major tensors [B, H, ...]."""
        g = self.gate(linear.dtype).view(1, -1, *([1] * (linear.dim() - 2)))
        return (1 - g) * linear + g * window

    def _proj(self, mixer, name):
        if name in self.own:
            return getattr(self, name)
        proj = getattr(mixer, name, None)
        if proj is None:
            raise ValueError(f"the {mixer.name!r} mixer has no {name} for its softmax window; the hybrid needs "
                             f"HybridWindow(own=({name!r},)) to give the window its own copy")
        return proj

    def qkv(self, mixer, x, position_embeddings):
        """q [B, H, T, D]; k, v [B, H_kv, T, D]: the teacher's projections of the layer input, RoPE on q, k."""
        q = split_heads(self._proj(mixer, "q_proj")(x), self.num_heads)
        k = split_heads(self._proj(mixer, "k_proj")(x), self.num_kv_heads)
        v = split_heads(self._proj(mixer, "v_proj")(x), self.num_kv_heads)
        if position_embeddings is None:
            raise ValueError("the hybrid's softmax window applies RoPE as the teacher does, but got "
                             "position_embeddings=None; pass the (cos, sin) pair of the model's rotary embedding")
        return apply_rope(q, position_embeddings), apply_rope(k, position_embeddings), v

    def init_state(self, batch_size, device, dtype) -> dict:
        shape = (batch_size, self.num_kv_heads)
        z = lambda n: torch.zeros(*shape, n, self.head_dim, device=device, dtype=dtype)  # noqa: E731
        return {"win_k": z(self.window), "win_v": z(self.window), "win_sink_k": z(self.sinks),
                "win_sink_v": z(self.sinks), "win_pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    # ---- the three forms -------------------------------------------------------------------
    def attend(self, mixer, x, position_embeddings, state, mode, new_state: dict) -> torch.Tensor:
        """The window branch's output [B, H, T, D]; its cache goes into ``new_state``."""
        q, k, v = self.qkv(mixer, x, position_embeddings)
        if state is not None and "win_pos" not in state:
            raise ValueError("the hybrid mixer got a state without its window cache (win_*); start generation "
                             "from the mixer's init_state()")
        p0 = 0 if state is None else int(state["win_pos"][0])
        if mode == "recurrent":
            o, cache = self._recurrent(q, k, v, p0, state)
        else:
            o, cache = self._chunk(q, k, v, p0, state)
        new_state.update(cache)
        return o

    def _chunk(self, q, k, v, p0, state):
        s, w, t = self.sinks, self.window, q.shape[2]
        b = q.shape[0]
        empty = k[:, :, :0]
        n_new_sinks = max(0, min(s, p0 + t) - p0)
        if state is None:
            past_sk = past_sv = past_wk = past_wv = empty
            base = self.init_state(b, q.device, k.dtype)
        else:
            base = state
            past_sk, past_sv = state["win_sink_k"][:, :, :min(s, p0)], state["win_sink_v"][:, :, :min(s, p0)]
            # the ring's positions >= s, oldest first (softmax does not care, the slicing below does)
            ring = torch.tensor([(j - s) % w for j in range(max(s, p0 - w), p0)], dtype=torch.long, device=q.device)
            past_wk, past_wv = state["win_k"].index_select(2, ring), state["win_v"].index_select(2, ring)
        k_sink = torch.cat([past_sk.to(k.dtype), k[:, :, :n_new_sinks]], 2)
        v_sink = torch.cat([past_sv.to(v.dtype), v[:, :, :n_new_sinks]], 2)
        k_win = torch.cat([past_wk.to(k.dtype), k[:, :, n_new_sinks:]], 2)
        v_win = torch.cat([past_wv.to(v.dtype), v[:, :, n_new_sinks:]], 2)
        win_start = max(s, p0 - w) if p0 > s else p0 + n_new_sinks
        o = window_attend(q, k_sink, v_sink, k_win, v_win, p0, win_start, w, self.block)
        # the cache after these tokens: the sinks so far, the last w window positions in their slots
        pad = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], s - x.shape[2], x.shape[3])], 2)  # noqa: E731
        end, m = p0 + t, min(w, k_win.shape[2])
        slots = torch.tensor([(j - s) % w for j in range(end - m, end)], dtype=torch.long, device=q.device)
        cache = {
            "win_k": base["win_k"].to(k.dtype).index_copy(2, slots, k_win[:, :, k_win.shape[2] - m:]),
            "win_v": base["win_v"].to(v.dtype).index_copy(2, slots, v_win[:, :, v_win.shape[2] - m:]),
            "win_sink_k": pad(k_sink), "win_sink_v": pad(v_sink),
            "win_pos": base["win_pos"] + t,
        }
        return o, cache

    def _recurrent(self, q, k, v, p0, state):
        """Token by token on the constant-size cache: write the token into its slot, then attend."""
        s, w = self.sinks, self.window
        c = dict(state) if state is not None else self.init_state(q.shape[0], q.device, k.dtype)
        sk, sv, rk, rv = (c[n].to(k.dtype) for n in ("win_sink_k", "win_sink_v", "win_k", "win_v"))
        h_kv, d = self.num_kv_heads, self.head_dim
        outs = []
        for i in range(q.shape[2]):
            pos = p0 + i
            kt, vt = k[:, :, i:i + 1], v[:, :, i:i + 1]
            if pos < s:  # out of place: a caller may still hold the previous state
                idx = torch.tensor([pos], device=q.device)
                sk, sv = sk.index_copy(2, idx, kt), sv.index_copy(2, idx, vt)
                keys, vals = sk[:, :, :pos + 1], sv[:, :, :pos + 1]
            else:
                idx = torch.tensor([(pos - s) % w], device=q.device)
                rk, rv = rk.index_copy(2, idx, kt), rv.index_copy(2, idx, vt)
                n = min(w, pos - s + 1)  # filled slots: 0 .. n-1 until the ring wraps, then all
                keys, vals = torch.cat([sk, rk[:, :, :n]], 2), torch.cat([sv, rv[:, :, :n]], 2)
            qg = _grouped(q[:, :, i:i + 1], h_kv)
            p = _softmax((qg @ keys.unsqueeze(2).transpose(-1, -2)) / math.sqrt(d))
            outs.append((p @ vals.unsqueeze(2)).reshape(q.shape[0], -1, 1, d))
        cache = {"win_k": rk, "win_v": rv, "win_sink_k": sk, "win_sink_v": sv, "win_pos": c["win_pos"] + q.shape[2]}
        return torch.cat(outs, 2), cache

    def matrix(self, mixer, x, position_embeddings) -> torch.Tensor:
        q, k, _ = self.qkv(mixer, x, position_embeddings)
        return window_matrix(q, k, self.sinks, self.window)

    # ---- the mix before o_proj ---------------------------------------------------------------
    def combine(self, mixer, o_linear, out_input, o_window) -> torch.Tensor:
        """y = o_proj(merge(g window + (1 - g) pre)), pre = the mixer's output() up to its o_proj.

        output() runs with o_proj swapped for a pass-through, so every mixer's own output norm
        and gate stay as they are and no mixer module needs a second code path; whatever module
        sits at o_proj (a LoRA wrapper included) then reads the mixed input."""
        proj = mixer._modules["o_proj"]
        stand_in = _CountingIdentity()
        mixer._modules["o_proj"] = stand_in
        try:
            pre = mixer.output(o_linear, out_input)
        finally:
            mixer._modules["o_proj"] = proj
        if stand_in.calls != 1:
            raise RuntimeError(f"the hybrid mixes just before o_proj, but {mixer.name!r}.output() called o_proj "
                               f"{stand_in.calls} times; its output() must end with one o_proj call")
        g = self.gate(pre.dtype).repeat_interleave(self.head_dim)  # [H * D], head-major as merge_heads
        return proj(g * merge_heads(o_window) + (1 - g) * pre)

    def parts(self, mixer, x, position_embeddings=None, mode="chunk") -> dict:
        """Both branches apart, for tests and the explorer: the linear branch's kernel output,
        values and map, the window's output, values and map, and the gate."""
        f = mixer.features(x, position_embeddings, None, {})
        o_lin, _ = mixer._run(f, mode, None)
        _, _, v_win = self.qkv(mixer, x, position_embeddings)
        return {"o_linear": o_lin, "v_linear": f.v, "a_linear": mixer.linear_matrix(x, position_embeddings),
                "o_window": self.attend(mixer, x, position_embeddings, None, mode, {}),
                "v_window": repeat_kv(v_win, self.num_heads),
                "a_window": self.matrix(mixer, x, position_embeddings), "gate": self.gate(x.dtype)}

    def copy_from_attention(self, attn: nn.Module, qkv_copy: bool = True) -> list[str]:
        if not self.own or not qkv_copy:
            return []
        notes = copy_linear_by_name(self, attn, self.own)
        return [f"hybrid window ({LABEL}): {n}" for n in notes]


def build(config, mixer_cls) -> HybridWindow | None:
    """The window branch for a mixer of class ``mixer_cls`` built with ``config``, or None."""
    st = settings(config.options)
    if st is None:
        return None
    own = () if mixer_cls.has_key else ("k_proj",)
    return HybridWindow(config, st, own)
