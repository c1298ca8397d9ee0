"""The paper preset's code paths at toy size on the CPU (issue 16): a tiny random teacher with
SmolLM2's tokenizer, the preset's seq 512 and bf16 autocast, `accelerate launch` with 2 CPU
processes, one step or so of each stage per kernel family. So the first GPU user does not meet a
crash the CPU could have shown. Batch 48 is not tried: the 49k-token vocabulary's logits at
48 x 512 take ~5 GB per process; the batch size changes shapes, not code paths.

Run: pytest -m slow tests/test_paper_preset_toy.py (minutes; stage 3 is the slow part)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.long]

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from linearize.teacher import resolve_teacher

    folder = tmp_path_factory.mktemp("toy_teacher")
    tok = AutoTokenizer.from_pretrained(resolve_teacher("embedded"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate command is not installed")
@pytest.mark.parametrize("arch", ["gla", "deltanet", "xlstm"])  # one per kernel family
def test_paper_preset_runs_every_stage_under_accelerate_launch(arch, toy_teacher, tmp_path):
    seq, batch, procs = 512, 2, 2
    tokens = seq * batch * procs  # one optimizer step per stage
    cmd = [ACCELERATE, "launch", "--num_processes", str(procs), "--cpu", "-m", "linearize.stages",
           "--arch", arch, "--preset", "paper", "--root", str(tmp_path),
           "--set", f"teacher={toy_teacher}", "--set", f"batch_size={batch}", "--set", "val_blocks=4",
           "--set", "val_batch_size=2", "--set", "checkpoint_every=1", "--set", "log_every=1",
           *[arg for s in (1, 2, 3) for arg in ("--set", f"stage{s}_tokens={tokens}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = next(tmp_path.glob(f"{arch}/*/"))
    params = yaml.safe_load((run / "params.yaml").read_text())
    assert params["seq_len"] == seq and params["bf16"] is True  # the paper preset's settings
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for stage in (1, 2, 3):
        assert (run / f"stage{stage}" / "done.json").exists()
        losses = [r["loss"] for r in records if r.get("event") == "step" and r.get("stage") == stage]
        assert losses and all(math.isfinite(x) for x in losses), (stage, losses)
    assert {r["after"] for r in records if r.get("event") == "eval"} >= {"stage1", "stage2", "stage3"}
