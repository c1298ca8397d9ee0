"""The shared-context scorer against lm-eval's own HFLM on the same requests: same
log-likelihoods and greedy flags, for the teacher's architecture and for students whose
cache is a recurrent state (float64 tiny models, so agreement is to rounding)."""
import pytest
import torch
from lm_eval.models.huggingface import HFLM

from linearize.convert import convert
from linearize.scoring import SharedContextLM


def _greedy(model, ctx, n):
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


def _requests(model, vocab):
    """Five contexts of length 7 and four of length 12 with 1-4 choices of 1-5 tokens (scored
    shared); two of length 9 (too few of that length), four of length 3 with a choice of 5
    tokens (too short to share) and a lone request: HFLM's path."""
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    reqs = []
    layout = [(7, [1, 3, 5, 2]), (7, [4, 4]), (7, [1, 1, 1]), (7, [2, 5]), (7, [3, 1, 2]),
              (12, [4, 4]), (12, [2, 3, 1, 1]), (12, [5, 2]), (12, [1, 4]), (9, [6, 2]), (9, [3, 3]),
              *[(3, [5, 2])] * 4]  # contexts shorter than a choice: HFLM's path
    for ctx_len, cont_lens in layout:
        ctx = rand(ctx_len)
        conts = [rand(n) for n in cont_lens]
        conts[0] = _greedy(model, ctx, cont_lens[0])  # one greedy continuation per context
        reqs += [(("c", "x"), ctx, cont) for cont in conts]
    reqs.insert(2, (("c", "y"), rand(5), rand(2)))  # a context shared with nobody, in the middle
    return reqs


@pytest.mark.parametrize("arch", ["teacher", "softmax", "deltanet", "gla", "xlstm", "mamba2"])
def test_shared_context_scores_equal_hflm(arch, tiny_llama, teacher):
    _, tok = teacher  # only for HFLM's set-up: the requests below are token ids already
    model = tiny_llama if arch == "teacher" else convert(tiny_llama, arch, qkv_copy=True).double().eval()
    reqs = _requests(model, tiny_llama.config.vocab_size)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")._loglikelihood_tokens(reqs, True)
    ours = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")._loglikelihood_tokens(reqs, True)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert sum(g for _, g in ref) >= 4  # the greedy continuations really are greedy
    # 1e-6, not float64 rounding: HF Llama's logits at a position already move by ~1e-7 with the
    # sequence length of the forward (its rotary tables are float32), cache or no cache
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], rel=1e-6, abs=1e-6)


def test_contexts_are_batched_by_length_and_read_once(tiny_llama, teacher, monkeypatch):
    _, tok = teacher
    reqs = _requests(tiny_llama, tiny_llama.config.vocab_size)
    lm = SharedContextLM(pretrained=tiny_llama, tokenizer=tok, batch_size=3, device="cpu")
    lm._state_row_bytes(1)  # its two probe forwards (1 and 2 tokens) before counting the real ones
    contexts, plain = [], []
    forward = lm._forward_with_cache
    monkeypatch.setattr(lm, "_forward_with_cache", lambda ids, cache=None, last_only=False: (
        contexts.append(tuple(ids.shape)) if last_only else None) or forward(ids, cache, last_only))
    hflm = HFLM._loglikelihood_tokens
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", lambda self, r, *a: plain.append(len(r)) or hflm(self, r, *a))
    rows = []
    score_plain = lm._score_plain
    monkeypatch.setattr(lm, "_score_plain", lambda r, idx, *a: rows.append(len(idx)) or score_plain(r, idx, *a))
    lm._loglikelihood_tokens(reqs, True)
    # longest contexts first, at most batch_size (3) documents per forward, each context once
    assert contexts == [(3, 12), (1, 12), (3, 7), (2, 7)]
    # the length-9 and length-3 documents and the lone request: one row each, HFLM not needed
    assert rows == [4 + 8 + 1] and plain == []


def test_plain_rows_project_only_the_scored_positions(tiny_llama, teacher):
    """The output projection sees one row per continuation token, not every padded position."""
    _, tok = teacher
    lm = SharedContextLM(pretrained=tiny_llama, tokenizer=tok, batch_size=4, device="cpu")
    seen = []
    handle = tiny_llama.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        reqs = [(("c", "x"), [5, 6, 7, 8, 9], [10, 11]), (("c", "y"), [5, 6], [12]), (("c", "z"), [3] * 20, [4, 4, 4])]
        lm._score_plain(reqs, [0, 1, 2])
    finally:
        handle.remove()
    assert seen == [(2 + 1 + 3, tiny_llama.config.hidden_size)]


def test_batches_are_capped_by_cache_bytes():
    from linearize.scoring import batch_documents
    # 4 choices a document: 5 rows of 100 bytes each; 1000 bytes hold two documents
    assert batch_documents([4] * 5, per_batch=8, row_bytes=100, budget=1000) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    # the count cap still applies when bytes are plentiful
    assert batch_documents([2] * 5, per_batch=3, row_bytes=1, budget=10**9) == [slice(0, 3), slice(3, 5)]
    # a document over the budget on its own is scored alone, not dropped
    assert batch_documents([1, 9, 1], per_batch=8, row_bytes=100, budget=500) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert batch_documents([], per_batch=8, row_bytes=1) == []


def test_state_budget_bounds_the_batch_and_keeps_the_scores(tiny_llama, teacher, monkeypatch):
    """A ReBased student (the largest state per row) under a budget of about two rows' cache:
    every shared-context forward holds at most that many rows, and the scores are those of the
    uncapped scorer."""
    _, tok = teacher
    model = convert(tiny_llama, "rebased", qkv_copy=True).double().eval()
    reqs = _requests(model, tiny_llama.config.vocab_size)
    free = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")._loglikelihood_tokens(reqs, True)
    lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")
    row = lm._state_row_bytes(7)
    cache = model(input_ids=torch.ones(3, 7, dtype=torch.long), use_cache=True).cache
    from linearize.memory import tensor_bytes
    assert row == pytest.approx(tensor_bytes(cache) / 3, rel=0.01)  # the measured line, at another length and batch
    lm.state_budget_bytes = 7 * row  # one document of <= 5 choices, or two of <= 2
    batches = []
    score_docs = lm._score_docs
    monkeypatch.setattr(lm, "_score_docs", lambda docs: batches.append([len(d) for d in docs]) or score_docs(docs))
    capped = lm._loglikelihood_tokens(reqs, True)
    assert all(len(b) + sum(b) <= 7 for b in batches)  # context rows + continuation rows
    assert len(batches) > 4  # the uncapped scorer needs 4 batches (see the test above)
    assert [g for _, g in capped] == [g for _, g in free]
    assert [ll for ll, _ in capped] == pytest.approx([ll for ll, _ in free], rel=1e-12)


def test_contexts_with_a_large_state_are_not_shared(tiny_llama, teacher, monkeypatch):
    """Above ``max_shared_row_bytes`` a row, every request is scored on its own row (no context
    state is copied per choice), with the same scores."""
    _, tok = teacher
    model = convert(tiny_llama, "rebased", qkv_copy=True).double().eval()
    reqs = _requests(model, tiny_llama.config.vocab_size)
    shared = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")._loglikelihood_tokens(reqs, True)
    lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")
    lm.max_shared_row_bytes = lm._state_row_bytes(1) - 1
    monkeypatch.setattr(lm, "_score_docs", lambda docs: pytest.fail("a context was shared"))
    rows = []
    score_plain = lm._score_plain
    monkeypatch.setattr(lm, "_score_plain", lambda r, idx, *a: rows.append(len(idx)) or score_plain(r, idx, *a))
    alone = lm._loglikelihood_tokens(reqs, True)
    assert rows == [len(reqs)]
    assert [g for _, g in alone] == [g for _, g in shared]
    assert [ll for ll, _ in alone] == pytest.approx([ll for ll, _ in shared], rel=1e-9)
