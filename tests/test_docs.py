"""The repository's text cites only what a user of the repository has: no team-only files
(STUDY.md, ENVIRONMENT.md, ../shared/), and every relative link in README.md and docs/ resolves."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = [*ROOT.glob("lib/**/*.py"), *ROOT.glob("notebooks/*"), *ROOT.glob("docs/*.md"), *ROOT.glob("tests/*.py"),
        *ROOT.glob("params/**/*.yaml"), *ROOT.glob("benchmarks/*.py"), ROOT / "README.md"]
OUTSIDE = re.compile(r"\b(STUDY|ENVIRONMENT|DESIGN)\.md\b|\.\./shared\b")


def test_no_reference_to_files_outside_the_repository():
    this = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in TEXT if p.is_file() and p.resolve() != this
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "cite docs/study.md or docs/environment.md instead: " + ", ".join(hits)


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
