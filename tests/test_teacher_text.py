"""Text the teacher samples itself (linearize.teacher_text) and separate training text
(``train_corpus``): the sampling is the teacher's own distribution, a crash loses nothing, and
a separate training source never holds the validation text."""
import json

import pytest
import torch

from linearize import params as P
from linearize import teacher_text
from linearize.data import CorpusError, token_blocks


def test_sampling_follows_the_teachers_own_distribution(tiny_llama):
    """Temperature 1 and no top-k / top-p: the frequencies of one sampled token match the
    teacher's softmax, computed apart in float64; transformers' default top-k of 50 would drop the
    tail (in a vocabulary of 97 the tail holds a large share of a random model's mass)."""
    prompt = torch.tensor([[5, 17, 33, 2]])
    n = 20000
    stop = 96
    rows = teacher_text.sample(tiny_llama, prompt.expand(n, -1).contiguous(), 1, [stop], seed=0)
    counts = torch.zeros(97, dtype=torch.float64)
    for row in rows:
        counts[row[4] if len(row) == 5 else stop] += 1  # a cut row sampled the stop token
    with torch.no_grad():
        p = torch.softmax(tiny_llama(prompt).logits[0, -1].double(), -1)
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < 0.03, tv
    top50 = torch.zeros_like(p)
    keep = p.topk(50).indices
    top50[keep] = p[keep] / p[keep].sum()
    assert 0.5 * (top50 - p).abs().sum().item() > 3 * 0.03  # the test could tell top-k sampling apart


def test_a_sample_ends_at_its_first_stop_token_and_keeps_its_prompt():
    class Scripted:
        def generate(self, input_ids, **kw):
            assert kw["do_sample"] and kw["temperature"] == 1.0 and kw["top_k"] == 0 and kw["top_p"] == 1.0
            tail = torch.tensor([[5, 7, 2, 9, 2], [4, 4, 4, 4, 4]])
            return torch.cat([input_ids, tail], 1)

    rows = teacher_text.sample(Scripted(), torch.tensor([[11, 12], [13, 14]]), 5, [2], seed=0)
    assert rows == [[11, 12, 5, 7], [13, 14, 4, 4, 4, 4, 4]]


@pytest.fixture(scope="module")
def small_vocab_teacher(teacher):
    """A random one-layer Llama with the embedded teacher's vocabulary (so its tokenizer's
    prompts fit), fast enough to sample from in a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=teacher[0].config.vocab_size, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False), teacher[1]


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i}.txt").write_text(f"Document {i} talks about the number {i * 7} and the river {i}. " * 6)
    return folder


def _params(corpus, tokens=300):
    return P.resolve("deltanet", "cpu-quick", {"corpus": str(corpus), "train_corpus": "teacher-text",
                                               "teacher_text_tokens": tokens, "teacher_text_prompt": 6,
                                               "teacher_text_new": 10})


def test_teacher_text_is_cached_and_a_crash_loses_only_the_batch_under_way(small_vocab_teacher, tmp_path, monkeypatch):
    model, tok = small_vocab_teacher
    params = _params(_corpus(tmp_path))
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache-a"))
    whole = teacher_text.ensure_corpus(model, tok, params, batch_size=8, progress=False)
    docs = [json.loads(line) for line in whole.read_text().splitlines()]
    meta = json.loads((whole.parent / "meta.json").read_text())
    assert meta["tokens"] == sum(d["tokens"] for d in docs) >= 300 > meta["tokens"] - 8 * 16
    assert all(7 <= d["tokens"] <= 16 or d["tokens"] == 6 for d in docs)  # prompt + at most 10 sampled
    prompts = token_blocks(tok, params["corpus"], 6, "train", params["val_fraction"]).tolist()
    starts = [tok.decode(p) for p in prompts]
    assert all(any(d["text"].startswith(s) for s in starts) for d in docs)  # from the training split's blocks

    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache-b"))
    real, calls = teacher_text.sample, []

    def dies_on_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(teacher_text, "sample", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        teacher_text.ensure_corpus(model, tok, params, batch_size=8, progress=False)
    batches = sorted((teacher_text.corpus_folder(params) / "batches").glob("batch-*.jsonl"))
    assert [len(b.read_text().splitlines()) for b in batches] == [8, 8]
    assert not (teacher_text.corpus_folder(params) / "docs.jsonl").exists()
    monkeypatch.setattr(teacher_text, "sample", real)
    resumed = teacher_text.ensure_corpus(model, tok, params, batch_size=8, progress=False)
    def texts(path):
        return [(d["text"], d["tokens"], d["batch"]) for d in map(json.loads, path.read_text().splitlines())]

    assert texts(resumed) == texts(whole)  # seeded per batch: the same documents as in one go
    assert json.loads((resumed.parent / "meta.json").read_text())["wall_s"] > 0

    monkeypatch.setattr(teacher_text, "sample", lambda *a, **k: pytest.fail("a cached corpus was generated again"))
    assert teacher_text.ensure_corpus(model, tok, params, batch_size=8, progress=False) == resumed


def test_a_separate_training_corpus_is_read_whole_and_never_holds_the_validation_text(teacher, tmp_path):
    from linearize.stages import training_blocks

    _, tok = teacher
    extra = _corpus(tmp_path)
    params = P.resolve("deltanet", "cpu-quick", {"corpus": "mix", "train_corpus": str(extra)})
    assert torch.equal(training_blocks(None, tok, params), token_blocks(tok, str(extra), params["seq_len"], "all"))
    for bad, words in (("sotu", "corpus='mix'"), ("mix:faq,wiki", "ood_corpus='wiki-val'")):
        with pytest.raises(CorpusError, match=words.replace("'", ".")):
            training_blocks(None, tok, {**params, "train_corpus": bad})


def test_train_corpus_enters_a_stage_identity_only_when_set():
    from linearize.runs import _fit_identity
    from linearize.stages import stage_identity

    plain = P.resolve("deltanet", "cpu-quick", {"readout_fit_tokens": 128})
    assert "train_corpus" not in stage_identity(plain, 3, "conversion")  # older run folders keep matching
    assert "train_corpus" not in _fit_identity(plain)
    gen = {**plain, "train_corpus": "teacher-text"}
    assert stage_identity(gen, 3, "conversion")["train_corpus"] == "teacher-text"
    assert _fit_identity(gen)["teacher_text_tokens"] == plain["teacher_text_tokens"]
    with pytest.raises(P.ParamsError, match="teacher_text_new"):
        P.validate({**gen, "teacher_text_new": 0})
    with pytest.raises(P.ParamsError, match="train_corpus"):
        P.validate({**gen, "train_corpus": 3})
