"""A converted student saved with ``save_student_folder`` opens as a plain Hugging Face folder:
in this process after ``import linearize``, and in a fresh process that never imports linearize
through ``trust_remote_code=True`` (transformers' AutoModelForCausalLM and lm-eval's HFLM, which
``lm_eval --model hf`` builds). Its logits are the student's, bit for bit; lm-eval's
log-likelihood is the one computed here from the student's own logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from linearize.convert import convert
from linearize.export import AUTO_MAP, SHIM_FILE, save_student_folder
from linearize.paths import ROOT
from linearize.teacher import resolve_teacher

CONTEXT, CONTINUATION = "The capital of France is", " Paris."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_teacher(None))  # the embedded teacher's tokenizer


@pytest.fixture(scope="module")
def student(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    teacher = LlamaForCausalLM(cfg).eval()
    # norm weights and the mixer's gates off their initial values, so a weight lost on the way shows
    s = convert(teacher, "gla", qkv_copy=True)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return s


def ids_of(tokenizer, text):
    return torch.tensor([tokenizer.encode(text)])


def fresh_copies(model):
    """Parameters in freshly allocated memory: BLAS results then no longer depend on the
    alignment of memory-mapped safetensors data (see test_convert's round trip)."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


def test_saved_folder_reloads_with_identical_logits(student, tokenizer, tmp_path):
    folder = save_student_folder(student, tokenizer, tmp_path / "final")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", SHIM_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "the temporary folder was left behind"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "linearized_llama"
    assert config["mixer"] == "gla"

    loaded = fresh_copies(AutoModelForCausalLM.from_pretrained(folder)).eval()  # linearize is imported here
    ids = ids_of(tokenizer, CONTEXT)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    assert AutoTokenizer.from_pretrained(folder).encode(CONTEXT) == tokenizer.encode(CONTEXT)
    # saving again replaces the folder; a loaded model saves to an equally loadable folder
    save_student_folder(loaded, tokenizer, folder)
    assert not (folder / "modeling.py").exists()
    with pytest.raises(TypeError, match="LinearizedLlamaForCausalLM"):
        save_student_folder(torch.nn.Linear(2, 2), tokenizer, tmp_path / "x")


CHILD = textwrap.dedent('''
    import json, sys, torch
    assert "linearize" not in sys.modules
    from transformers import AutoModelForCausalLM
    folder, out = sys.argv[1], sys.argv[2]
    try:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
        refused = ""
    except ValueError as err:
        refused = str(err)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    for p in model.parameters():
        p.data = p.data.clone()
    ids = torch.tensor([json.loads(sys.argv[3])])
    with torch.no_grad():
        torch.save(model(ids).logits, out + "/logits.pt")

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=folder, trust_remote_code=True, device="cpu", batch_size=1)
    request = Instance(request_type="loglikelihood", doc={}, arguments=(sys.argv[4], sys.argv[5]), idx=0)
    (loglik, greedy), = lm.loglikelihood([request])
    json.dump({"refused": refused, "class": type(lm.model).__module__ + "." + type(lm.model).__name__,
               "loglik": loglik, "greedy": greedy}, open(out + "/child.json", "w"))
''')


def test_a_fresh_process_opens_the_folder_with_trust_remote_code(student, tokenizer, tmp_path):
    folder = save_student_folder(student, tokenizer, tmp_path / "final")
    ids = tokenizer.encode(CONTEXT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path), json.dumps(ids), CONTEXT,
                           CONTINUATION], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads((tmp_path / "child.json").read_text())
    # without trust_remote_code transformers refuses and says what to pass
    assert "trust_remote_code=True" in child["refused"]
    assert child["class"] == "linearize.modeling.LinearizedLlamaForCausalLM"
    with torch.no_grad():
        logits = student(torch.tensor([ids])).logits
    # another process may run with another thread count (an earlier test can call
    # torch.set_num_threads here), which changes float32 summation order: equal to rounding
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=1e-5, atol=1e-5)

    # the reference log-likelihood: lm-eval scores the continuation's tokens after the context
    context, whole = tokenizer.encode(CONTEXT), tokenizer.encode(CONTEXT + CONTINUATION)
    assert whole[:len(context)] == context
    with torch.no_grad():
        logp = torch.log_softmax(student(torch.tensor([whole])).logits[0].double(), -1)
    targets = whole[len(context):]
    expected = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(targets))
    greedy = all(logp[len(context) - 1 + i].argmax().item() == t for i, t in enumerate(targets))
    assert child["loglik"] == pytest.approx(expected, rel=1e-5)
    assert child["greedy"] == greedy


def test_run_pipeline_ends_with_the_final_folder(student, tokenizer, tmp_path, monkeypatch):
    """After the run's last enabled stage, outputs/<arch>/<run>/final holds that stage's student."""
    import linearize.data
    from linearize import params as P
    from linearize import stages as S

    teacher = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in student.config.to_dict().items()
                                              if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "max_position_embeddings")}))
    teacher.eval().requires_grad_(False)
    blocks = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linearize.data, "token_blocks", lambda tok, corpus, seq, split, *a, **k: blocks)
    params = P.resolve("gla", overrides=dict(seq_len=16, batch_size=4, stage1_tokens=64, stage2_tokens=64,
                                             stage3_tokens=64, run_name="t", val_blocks=2, val_batch_size=2,
                                             measure_teacher_throughput=False))
    out = S.run_pipeline(params, stages=(1, 2), teacher=teacher, tokenizer=tokenizer, root=tmp_path, progress=False)
    assert out["finished"] and not (out["run"].dir / "final").exists()  # stage 3 is still to come
    out = S.run_pipeline(params, stages=(3,), teacher=teacher, tokenizer=tokenizer, root=tmp_path, progress=False)
    loaded = fresh_copies(AutoModelForCausalLM.from_pretrained(out["run"].dir / "final")).eval()
    stage3 = torch.load(out["run"].dir / "stage3" / "student.pt", weights_only=True)
    assert loaded.state_dict().keys() == stage3.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in stage3.items())
    ids = ids_of(tokenizer, CONTEXT)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out["student"].eval()(ids).logits)
