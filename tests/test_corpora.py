"""The registry corpora (linearize.corpora), mixes, and the out-of-domain validation."""
import math
import random
import subprocess

import pytest
import torch

from linearize import corpora
from linearize import data as D
from linearize import params as P
from linearize import stages as S

WIKI_SNIPPET = """{{Infobox person
| name = Ada Example
| image = Ada.jpg
}}
'''Ada Example''' (born 1815) was an English [[mathematician]] and [[Writer|writer]].<ref name="a">{{cite book |title=X}}</ref> She worked on the [[Analytical Engine|analytical engine]]{{citation needed|date=May 2015}}.<!-- a hidden comment -->
[[File:Ada.jpg|thumb|Ada in 1840, with [[Charles Babbage|Babbage]]]]

== Early life ==
Her father was ''Lord Byron''; see [http://example.org the archive] for letters.
* She studied mathematics.
* She met [[Charles Babbage]] in 1833.
{| class="wikitable"
|-
! Year !! Event
|-
| 1833 || Met Babbage
|}
Her notes include &nbsp;the first algorithm<ref>Menabrea 1842.</ref>.

== See also ==
* [[Computer programming]]

== References ==
{{reflist}}

[[Category:1815 births]]
[[de:Ada Example]]
"""

WIKI_TEXT = (
    "Ada Example (born 1815) was an English mathematician and writer. She worked on the analytical engine.\n"
    "\n"
    "Early life\n"
    "\n"
    "Her father was Lord Byron; see the archive for letters.\n"
    "She studied mathematics.\n"
    "She met Charles Babbage in 1833.\n"
    "Her notes include the first algorithm."
)


def test_wikitext_to_text_keeps_the_prose_only():
    assert corpora.wikitext_to_text(WIKI_SNIPPET) == WIKI_TEXT


def test_wiki_dump_skips_redirects_and_other_namespaces():
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    xml = f"""<mediawiki xmlns="{ns}">
      <page><title>Real</title><ns>0</ns><revision><text>'''Real''' text.</text></revision></page>
      <page><title>Moved</title><ns>0</ns><redirect title="Real" /><revision><text>#REDIRECT [[Real]]</text></revision></page>
      <page><title>Old</title><ns>0</ns><revision><text>#redirect [[Real]]</text></revision></page>
      <page><title>Wikipedia:Rules</title><ns>4</ns><revision><text>Rules.</text></revision></page>
    </mediawiki>"""
    assert corpora.parse_wiki_dump(xml) == [("Real", "'''Real''' text.")]


FAQ_SNIPPET = """# A.1 What is anarchism?

Anarchism is a _"political theory"_ which aims to
create **anarchy**. [P-J Proudhon, **What is
Property** , p. 264]

> _"Change opinion, convince the public
> that government is harmful."_ [ **Anarchy** , p. 16]

## 1\\. A list follows
groups?

  * first item
  * second [link text](http://example.org/a_(b)) here

* * *

[‹ A.0 Section A Introduction](secAint.md "Go to previous page")
[up](secAcon.md "Go to parent page") [A.2 What does anarchism stand for?
›](secA2.md "Go to next page")
"""

FAQ_TEXT = (
    "A.1 What is anarchism?\n\n"
    'Anarchism is a "political theory" which aims to create anarchy. [P-J Proudhon, What is Property, p. 264]\n\n'
    '"Change opinion, convince the public that government is harmful." [Anarchy, p. 16]\n\n'
    "1. A list follows groups?\n\n"
    "first item\n\n"
    "second link text here"
)


def test_faq_markdown_to_text_unwraps_and_drops_markup():
    assert corpora.faq_markdown_to_text(FAQ_SNIPPET) == FAQ_TEXT


# --- the cached corpora: read offline ------------------------------------------------------
@pytest.fixture(scope="module")
def offline():
    """Loading from the cache must not download: any subprocess (pip, apt-get, npm) fails."""
    mp = pytest.MonkeyPatch()

    def refuse(*a, **k):
        raise AssertionError(f"loading a corpus ran {a[0] if a else k}: it is not in the cache yet "
                             "(`python -m linearize.assets` fetches it) or loading it downloads again")

    mp.setattr(subprocess, "run", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def wiki(offline):
    return {part: D.load_documents(name) for part, name in
            (("all", "wiki"), ("train", "wiki-train"), ("val", "wiki-val"))}


@pytest.fixture(scope="module")
def faq(offline):
    return D.load_documents("faq")


def test_wiki_loads_offline_and_its_split_is_fixed_and_disjoint(wiki):
    all_, train, val = wiki["all"], wiki["train"], wiki["val"]
    assert len(all_) == 106  # the articles of the excerpt (the other 99 pages are redirects)
    assert not {d.id for d in train} & {d.id for d in val}
    assert not {d.text for d in train} & {d.text for d in val}
    assert {d.id for d in train} | {d.id for d in val} == {d.id for d in all_}
    assert 0.1 < len(val) / len(all_) < 0.4
    # membership depends on the title alone: no run parameter (seed, val_fraction) moves it
    assert all(corpora.in_wiki_ood(d.id.removeprefix("wiki:")) for d in val)
    assert not any(corpora.in_wiki_ood(d.id.removeprefix("wiki:")) for d in train)
    text = "\n".join(d.text for d in all_)
    for markup in ("{{", "}}", "<ref", "'''", "[[Category:", "&nbsp;"):
        assert markup not in text, markup
    assert (corpora.cache_dir("corpora") / "wiki" / "LICENSE").read_text().count("CC BY-SA 3.0") == 1


def test_faq_loads_offline(faq):
    assert len(faq) > 100 and all(d.id.startswith("faq:") for d in faq)
    text = "\n".join(d.text for d in faq)
    assert len(text) > 5_000_000
    assert "\n>" not in text and "Go to next page" not in text
    assert text.count("**") <= 10  # a few unclosed ones in the source itself; thousands closed
    assert "GPL-2" in (corpora.cache_dir("corpora") / "faq" / "LICENSE").read_text()


def test_mix_interleaves_its_parts_and_keeps_their_splits(wiki, faq, offline):
    sotu = D.load_documents("sotu")
    mix = D.load_documents("mix")
    assert D.mix_parts("mix") == ["sotu", "wiki-train", "faq"]
    assert sorted(d.id for d in mix) == sorted(d.id for d in sotu + wiki["train"] + faq)
    # interleaved: every part shows up among the first 40 documents
    head = {("wiki" if d.id.startswith("wiki:") else "faq" if d.id.startswith("faq:") else "sotu") for d in mix[:40]}
    assert head == {"sotu", "wiki", "faq"}
    train, val = D.split_documents(mix, 0.05, seed=0)
    assert not {d.text for d in train} & {d.text for d in val}
    # the speeches held out alone stay held out inside the mix
    _, sotu_val = D.split_documents(sotu, 0.05, seed=0)
    assert {d.id for d in sotu_val} <= {d.id for d in val}
    # the out-of-domain articles are nowhere in it
    assert not {d.text for d in wiki["val"]} & {d.text for d in mix}


@pytest.mark.parametrize("corpus", ["wiki", "wiki-val", "mix:sotu,wiki", "mix:faq,wiki-val"])
def test_training_on_the_ood_text_is_refused(corpus):
    with pytest.raises(D.CorpusError, match="overlaps the training corpus"):
        D.check_ood_disjoint(corpus, "wiki-val")


def test_ood_check_passes_disjoint_sources_and_catches_a_shared_path(tmp_path):
    for corpus in ("embedded", "mix", "mix:sotu,faq", "wiki-train", str(tmp_path)):
        D.check_ood_disjoint(corpus, "wiki-val")
    with pytest.raises(D.CorpusError, match="overlaps"):
        D.check_ood_disjoint("embedded", "sotu")
    with pytest.raises(D.CorpusError, match="overlaps"):
        D.check_ood_disjoint(f"mix:sotu,{tmp_path}", str(tmp_path / "."))


@pytest.mark.parametrize("spec", ["mix:", "mix:sotu,sotu", "mix:sotu,mix", "mix:sotu,fineweb"])
def test_bad_mix_is_explained(spec):
    with pytest.raises(D.CorpusError, match="mix"):
        D.mix_parts(spec)


# --- out-of-domain validation in the pipeline ----------------------------------------------
def _word_tokenizer(n_words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")


def _folder(root, name, words, n_docs, seed):
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir()
    for d in range(n_docs):
        (folder / f"{name}{d:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(150)))
    return folder


def test_ood_blocks_are_spread_over_the_whole_source(tmp_path):
    tok = _word_tokenizer(90)
    ood = _folder(tmp_path, "ood", [f"w{i}" for i in range(60, 90)], 10, seed=1)
    params = {"corpus": "embedded", "ood_corpus": str(ood), "seq_len": 16, "ood_val_blocks": 5, "val_fraction": 0.05}
    every = D.token_blocks(tok, str(ood), 16, "all")
    assert every.shape[0] == (10 * 151) // 16  # 150 words and a separator per document
    got = D.ood_blocks(tok, params)
    assert torch.equal(got, every[[0, 23, 46, 70, 93]])  # round(k * 93 / 4), k = 0..4
    assert D.ood_blocks(tok, {**params, "ood_corpus": ""}) is None


def test_eval_records_carry_ood_metrics(tiny_llama, tmp_path):
    """A softmax student with the teacher's weights is the teacher: ood_kl ~ 0 and both
    perplexities equal the teacher's own loss on the same blocks (transformers' loss)."""
    tok = _word_tokenizer(90)
    train = _folder(tmp_path, "train", [f"w{i}" for i in range(60)], 20, seed=0)
    ood = _folder(tmp_path, "ood", [f"w{i}" for i in range(60, 90)], 10, seed=1)
    params = P.resolve("softmax", overrides=dict(
        corpus=str(train), ood_corpus=str(ood), ood_val_blocks=4, seq_len=16, val_fraction=0.2, val_blocks=2,
        val_batch_size=2, qkv_copy=True, attention_transfer=False, matrix_mixing=False, h2h=False, distill=False,
        run_name="t"))
    out = S.run_pipeline(params, teacher=tiny_llama, tokenizer=tok, root=tmp_path / "out", progress=False)
    (record,) = [m for m in out["run"].metrics() if m.get("event") == "eval"]
    blocks = D.ood_blocks(tok, params)
    with torch.no_grad():
        ref = math.exp(tiny_llama(input_ids=blocks, labels=blocks).loss.item())
    assert record["ood_n_blocks"] == 4
    # transformers computes its loss from float32 logits (the model is float64): 1e-6
    assert record["ood_teacher_perplexity"] == pytest.approx(ref, rel=1e-6)
    assert record["ood_perplexity"] == pytest.approx(ref, rel=1e-6)
    assert abs(record["ood_kl"]) < 1e-8
    # and the in-domain numbers are still there, on other text
    assert record["teacher_perplexity"] != pytest.approx(ref, rel=1e-3)
    off = P.resolve("softmax", overrides={**{k: params[k] for k in ("corpus", "seq_len", "val_fraction")},
                                          "ood_corpus": ""})
    assert D.ood_blocks(tok, off) is None
