"""The CUDA path's set-up and dtype contract, checked without a GPU (issue 16).

* Triton is installed wherever FLA is: FLA 0.6 lists triton only under its own extras.
* DeltaNet in float32: FLA's chunk_delta_rule refuses float32, so backend "auto" runs ours.
* The kernel state (the generation cache) is float32 for fp16/bf16 models on every backend:
  FLA's chunk_gla asserts a float32 initial state, and FLA returns float32 states.
FLA's kernels themselves run under Triton's interpreter in tests/fla_interpret (own process)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

from linearize import kernels, mixers
from linearize.kernels import dispatch
from linearize.mixers import MixerConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_fla_extra_installs_triton_and_the_lock_pins_both():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [re.split(r"[<>=\[ ;]", req, maxsplit=1)[0] for req in extras["fla"]]
    assert "flash-linear-attention" in names and "triton" in names, extras["fla"]
    lock = (ROOT / "requirements" / "cpu-lock.txt").read_text().splitlines()
    assert "triton==3.9.0" in lock and "flash-linear-attention==0.6.0" in lock
    env = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*- triton==3\.9\.0\s*$", env, re.M), "environment.yml must pin triton"
    assert re.search(r"^\s*- flash-linear-attention==0\.6\.0\s*$", env, re.M)


def test_delta_rule_in_float32_is_routed_to_our_kernel_not_to_fla():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    for dtype in (torch.float32, torch.float64):
        assert not dispatch.use_fla("auto", cuda, "the delta rule", dtype=dtype,
                                    fla_dtypes=dispatch.FLA_DELTA_DTYPES)
    assert not dispatch.use_fla("auto", cuda, "gated linear attention", dtype=torch.float64,
                                fla_dtypes=dispatch.FLA_GATED_DTYPES)
    assert dispatch.FLA_DELTA_DTYPES == (torch.float16, torch.bfloat16)


def test_fla_dtype_is_autocasts_inside_autocast():
    q, v = torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16)
    assert dispatch.fla_dtype(q, v) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.fla_dtype(q, v) == torch.bfloat16


def test_the_interpreter_hook_refuses_to_run_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.allow_cpu_under_triton_interpreter(True)
    assert not dispatch.use_fla("auto", torch.device("cpu"), "op")


RECURRENT = [n for n in mixers.available() if n != "softmax"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 1, 16


def make(name, dtype):
    torch.manual_seed(0)
    m = mixers.build(name, MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, chunk_size=16, backend="torch"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype)


def rope(t, dtype):
    inv = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", RECURRENT)
def test_kernel_state_dtype_is_at_least_float32_and_generation_tracks_float64(name, dtype):
    """init_state, the chunked prefill and the recurrent steps all keep the kernel state in
    state_dtype (float32 for half precision), conv windows in the model dtype; a prefill from
    init_state plus single steps stays close to the float64 forward."""
    ref = make(name, torch.float64)
    m = make(name, dtype)
    t, cut = 24, 16
    x = torch.randn(1, t, HIDDEN, dtype=torch.float64)
    cos, sin = rope(t, torch.float64)
    y_ref, _ = ref(x, (cos, sin), mode="chunk")
    sd = kernels.state_dtype(dtype)
    assert sd == (torch.float64 if dtype == torch.float64 else torch.float32)
    state = m.init_state(1, x.device, dtype)
    xs, cs, ss = x.to(dtype), cos.to(dtype), sin.to(dtype)
    y0, state = m(xs[:, :cut], (cs[:, :cut], ss[:, :cut]), state=state, mode="chunk")
    ys = [y0]
    for i in range(cut, t):
        y_t, state = m(xs[:, i:i + 1], (cs[:, i:i + 1], ss[:, i:i + 1]), state=state)
        ys.append(y_t)
    for key, value in state.items():
        assert value.dtype == (dtype if key.startswith("conv_") else sd), (key, value.dtype)
    y = torch.cat(ys, 1)
    assert y.dtype == dtype
    tol = {torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    err = (y.double() - y_ref).abs().max().item()
    assert err <= tol * max(1.0, y_ref.abs().max().item()), f"max abs error {err:.3e}"
