"""Forward+backward speed and peak memory of every mixer's forms on the CPU.

For each mixer and length T (B=1, H=9 query / 3 KV heads, head_dim 64, hidden 576: SmolLM2-135M's
attention shapes, float32) it times one forward+backward pass of
  chunk      mixer.core(x, mode="chunk")      projections + our chunked kernel
  recurrent  mixer.core(x, mode="recurrent")  projections + our token-by-token recurrence
  fla-naive  projections + FLA's naive.py reference of the same recurrence, where FLA has one
and, for softmax, the teacher's attention via torch sdpa (chunk) and a growing KV cache
(recurrent). The output path (norm, gate, o_proj) is left out: it is the same for every form.

Memory: each cell runs in a fresh Python process; "peak MB" is the growth of the process's peak
resident set (getrusage ru_maxrss) over its value just before the measured pass, so it counts
everything the pass allocates (activations saved for backward, gradients, temporaries).
Speed: tokens/s = T / seconds of the fastest of up to 3 passes (the first one included).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mixers.py [--lengths 512 2048] [--mixers gla ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 576, 9, 3, 64
VARIANTS = ("chunk", "recurrent", "fla-naive")
# recurrent fwd+bwd keeps one state per step for backward: skip when that alone would be huge
MAX_SAVED_STATE_GB = 3.0


def fla_naive(family):
    import fla  # noqa: F401  (only to locate the package; fla.ops is not imported)

    spec = importlib.util.find_spec("fla")
    path = Path(spec.submodule_search_locations[0]) / "ops" / family / "naive.py"
    if not path.exists():
        raise FileNotFoundError(path)
    mod_spec = importlib.util.spec_from_file_location(f"fla_naive_{family}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def fla_reference(name, m, x, pe):
    """The FLA naive computation matching mixer ``name``, on the mixer's own features; or None."""
    import torch.nn.functional as F

    btf = lambda *ts: [t.transpose(1, 2) for t in ts]  # noqa: E731  [B,H,T,K] -> [B,T,H,K]
    if name in ("gla", "hgrn2", "metala"):
        f = m.features(x, pe, None, {})
        return lambda: fla_naive("gla").naive_recurrent_gla(*btf(f.q, f.k, f.v, f.g))[0]
    if name == "retnet":
        f = m.features(x, pe, None, {})
        return lambda: fla_naive("retention").naive_retention(f.q, f.k, f.v)
    if name == "mamba2":
        f = m.features(x, pe, None, {})
        return lambda: fla_naive("simple_gla").naive_chunk_simple_gla(*btf(f.q, f.k, f.v, f.g[..., 0]))[0]
    if name == "deltanet":
        f = m.features(x, pe, None, {})
        return lambda: fla_naive("delta_rule").delta_rule_chunkwise(f.q, f.k, f.v, f.beta)[0]
    if name == "rebased":  # FLA's kernel squares (s q~.k~) itself: give it the normalised q~, k~
        q, k = m.heads(m.q_proj(x)), m.heads(m.k_proj(x), kv=True)
        aff = lambda t: F.layer_norm(t, t.shape[-1:]) * m.gamma + m.beta  # noqa: E731
        v = m.heads(m.v_proj(x), kv=True)
        return lambda: fla_naive("rebased").naive_parallel_rebased(aff(q), aff(k), v)
    if name == "hedgehog":
        f = m.features(x, pe, None, {})
        return lambda: fla_naive("linear_attn").naive_chunk_linear_attn(*btf(f.q, f.k, f.v), normalize=True)
    return None


def run_cell(name, t, variant):
    import torch

    from linearize.mixers import MixerConfig, build

    torch.manual_seed(0)
    cfg = MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, chunk_size=64, backend="torch")
    m = build(name, cfg).float()
    x = torch.randn(1, t, HIDDEN, requires_grad=True)
    inv = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    ang = torch.arange(t).float()[:, None] * inv
    emb = torch.cat([ang, ang], -1)[None]
    pe = (emb.cos(), emb.sin())

    if variant == "recurrent" and name != "softmax":
        state_numel = sum(v.numel() for v in m.init_state(1, "cpu", torch.float32).values())
        gb = 2 * t * state_numel * 4 / 2**30  # ~ two saved copies of the state per step
        if gb > MAX_SAVED_STATE_GB:
            return {"skip": f"~{gb:.0f} GB of per-step states"}

    def make_pass():
        if variant == "fla-naive":
            ref = fla_reference(name, m, x, pe)
            if ref is None:
                return None
            return lambda: ref().float().square().mean().backward()
        return lambda: m.core(x, pe, mode=variant).o.square().mean().backward()

    try:
        one = make_pass()
    except FileNotFoundError as exc:
        return {"skip": f"no {exc}"}
    if one is None:
        return {"skip": "FLA has none"}

    def fresh():  # recompute features each pass so backward frees its graph
        f = make_pass()
        x.grad = None
        m.zero_grad(set_to_none=True)
        return f

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        f = fresh()
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
        if sum(times) > 20:
            break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tok_s": t / min(times), "peak_mb": (peak - base) / 1024, "passes": len(times)}


def main():
    from linearize.mixers import available

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--mixers", nargs="+", default=available())
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--cell", nargs=3, metavar=("MIXER", "T", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    if args.cell:
        name, t, variant = args.cell
        print(json.dumps(run_cell(name, int(t), variant)))
        return

    import torch

    print(f"# mixers forward+backward on CPU: B=1, H={HEADS} (KV {KV_HEADS}), head_dim={HEAD_DIM}, "
          f"hidden={HIDDEN}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("# tok/s = T / fastest pass; MB = peak RSS growth during the passes (fresh process per cell)\n")
    head = "| mixer | T | " + " | ".join(f"{v} tok/s | {v} MB" for v in args.variants) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(args.variants)))
    results = []
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    for name in args.mixers:
        for t in args.lengths:
            row = [name, str(t)]
            for variant in args.variants:
                proc = subprocess.run([sys.executable, __file__, "--cell", name, str(t), variant],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    res = {"skip": f"failed: {proc.stderr.strip().splitlines()[-1][:60]}"}
                else:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append({"mixer": name, "T": t, "variant": variant, **res})
                if "skip" in res:
                    row += [f"- ({res['skip']})", "-"]
                else:
                    row += [f"{res['tok_s']:.0f}", f"{res['peak_mb']:.0f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
