"""The repository stands alone: no citations of files outside it, and every docs/ citation resolves.

(a) no tracked file cites the old out-of-repository specification;
(b) every ``docs/<name>.md`` mentioned in a .py or .md file exists;
(c) every ``docs/CONVENTIONS.md §N`` citation names a ``## N.`` heading of that document.
Fast, no torch, no network.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONVENTIONS = "docs/CONVENTIONS.md"

# Built from pieces so this file does not match its own patterns.
FORBIDDEN = ("DESIGN" + ".md", "DESIGN" + " s", ".." + "/shared/")
DOC_PATH = re.compile(r"\bdocs/[A-Za-z0-9_./-]+?\.md\b")
# "docs/CONVENTIONS.md §5", "docs/CONVENTIONS.md §1, §4", "docs/CONVENTIONS.md §5 and §10"
CITATION = re.compile(re.escape(CONVENTIONS) + r"((?:\s*(?:,|and)?\s*§\s*\d+)+)")
SECTION = re.compile(r"§\s*(\d+)")
HEADING = re.compile(r"^## (\d+)\. \S", re.M)


def _repo_files() -> list[Path]:
    """Files git tracks plus new files it does not ignore (work not yet committed)."""
    if shutil.which("git") is None:
        pytest.skip("git is not available")
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        pytest.skip(f"git ls-files failed here: {e}")
    names = sorted({n for n in out.decode("utf-8", "replace").split("\0") if n})
    if not names:
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None  # binary (images)
    return data.decode("utf-8", "replace")


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    out = {}
    for p in _repo_files():
        t = _text(p)
        if t is not None:
            out[p.relative_to(ROOT).as_posix()] = t
    return out


@pytest.fixture(scope="module")
def sources(texts) -> dict[str, str]:
    return {k: v for k, v in texts.items() if k.endswith((".py", ".md"))}


def test_no_citation_of_files_outside_the_repository(texts):
    bad = [f"{name}:{_line(t, m.start())}: {pat!r}"
           for name, t in texts.items() for pat in FORBIDDEN
           for m in re.finditer(re.escape(pat), t)]
    assert not bad, ("cite the project's own docs (docs/...) instead of files outside the "
                     "repository:\n  " + "\n  ".join(bad))


def test_cited_docs_exist(sources):
    missing = sorted({f"{name}: {m.group(0)}" for name, t in sources.items()
                      for m in DOC_PATH.finditer(t) if not (ROOT / m.group(0)).is_file()})
    assert not missing, "documents cited but not in the repository:\n  " + "\n  ".join(missing)


def test_conventions_headings_are_numbered_in_order():
    text = (ROOT / CONVENTIONS).read_text(encoding="utf-8")
    numbers = [int(n) for n in HEADING.findall(text)]
    assert len(numbers) >= 10 and numbers == list(range(1, len(numbers) + 1))


def test_conventions_citations_name_existing_sections(sources):
    headings = {int(n) for n in HEADING.findall((ROOT / CONVENTIONS).read_text(encoding="utf-8"))}
    cited, bad = 0, []
    for name, t in sources.items():
        if name == "tests/test_docs.py":
            continue  # its own examples
        for m in CITATION.finditer(t):
            for n in SECTION.findall(m.group(1)):
                cited += 1
                if int(n) not in headings:
                    bad.append(f"{name}:{_line(t, m.start())}: §{n}")
    assert not bad, (f"{CONVENTIONS} has sections {sorted(headings)}; these citations point "
                     "elsewhere:\n  " + "\n  ".join(bad))
    assert cited > 0  # the code does cite the conventions; a regex that finds none is broken


def test_citation_pattern_reads_lists():
    text = "docs/CONVENTIONS.md §1, §4 and docs/CONVENTIONS.md §5 and §10; docs/CONVENTIONS.md."
    found = [SECTION.findall(m.group(1)) for m in CITATION.finditer(text)]
    assert found == [["1", "4"], ["5", "10"]]
