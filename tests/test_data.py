import pytest
import torch

from linearize import data
from linearize.data import CorpusError, load_documents, split_documents, token_blocks


@pytest.fixture(scope="module")
def tok(teacher):
    return teacher[1]


def test_blocks_have_exact_length_and_are_deterministic(tok):
    a = token_blocks(tok, seq_len=128, split="validation", max_blocks=50)
    assert a.shape == (50, 128) and a.dtype == torch.long
    # Recomputed from the documents, bypassing the token cache: the same blocks.
    b = token_blocks(tok, seq_len=128, split="validation", max_blocks=50, use_cache=False)
    assert torch.equal(a, b)


def test_documents_are_joined_by_the_separator(tok, tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.txt").write_text("gamma delta")
    docs = load_documents(tmp_path / "*.txt")
    stream = data.token_stream(tok, docs)
    sep = data.separator_id(tok)
    assert tok.convert_ids_to_tokens(sep) == "<|endoftext|>"
    assert (stream == sep).sum() == 2 and stream[-1] == sep
    assert tok.decode(stream[: (stream == sep).nonzero()[0, 0]]) == "alpha beta"


def test_train_and_validation_share_no_document():
    docs = load_documents("embedded")
    train, val = split_documents(docs, 0.05, seed=0)
    assert len(train) + len(val) == len(docs) and len(val) >= 5
    assert not {d.id for d in train} & {d.id for d in val}
    assert not {d.text for d in train} & {d.text for d in val}
    # the split is per document, so it does not depend on order
    train2, val2 = split_documents(list(reversed(docs)), 0.05, seed=0)
    assert {d.id for d in val2} == {d.id for d in val}


def test_embedded_corpus_size(tok):
    train = token_blocks(tok, seq_len=512, split="train")
    assert train.numel() > 1_500_000  # about 2.0M tokens with the SmolLM2 tokenizer


def test_local_jsonl_source(tmp_path, tok):
    (tmp_path / "c.jsonl").write_text('{"text": "one doc"}\n{"text": "two doc"}\n')
    docs = load_documents(tmp_path / "c.jsonl")
    assert [d.text for d in docs] == ["one doc", "two doc"]


@pytest.mark.parametrize("source", ["no/such/dir", "missing_*.txt"])
def test_bad_source_is_explained(source):
    with pytest.raises(CorpusError, match="corpus source|matched no"):
        load_documents(source)


def test_empty_source_is_explained(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        load_documents(tmp_path)


def test_too_short_split_is_explained(tmp_path, tok):
    for i in range(40):
        (tmp_path / f"{i}.txt").write_text("tiny")
    with pytest.raises(CorpusError, match="fewer than one block"):
        token_blocks(tok, source=tmp_path, seq_len=512, split="validation", val_fraction=0.2)


def test_fineweb_offline_fails_clearly():
    with pytest.raises(CorpusError, match="internet"):
        load_documents("fineweb", max_docs=2)
