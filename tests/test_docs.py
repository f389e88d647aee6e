"""The README a newcomer reads and the pages under docs/: the README stays short with the two set-up commands
first, and every relative link in it or in docs/*.md leads to a file (and heading) inside the repository."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

#: The two commands a newcomer copies first, byte for byte: the main job, then the tests.
SETUP_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/autokd search --budget 50",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest',
)
MAX_README_LINES = 300
SETUP_WITHIN_LINES = 30

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(path: Path) -> str:
    """The Markdown of ``path`` without its fenced code blocks (code is not links or headings)."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_prose(path))}


def _relative_links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_docs_pages_exist() -> None:
    assert (DOCS / "README.md").is_file()
    assert len(PAGES) > 2, PAGES


def test_readme_is_short_with_the_two_setup_commands_first() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    for command in SETUP_COMMANDS:
        assert command in lines[:SETUP_WITHIN_LINES], f"not in the first {SETUP_WITHIN_LINES} lines: {command}"


def test_readme_points_nowhere_outside_the_repository() -> None:
    assert "../" not in README.read_text(encoding="utf-8")


def test_relative_links_lead_to_files_and_headings_in_the_repository() -> None:
    broken = []
    for page in PAGES:
        for target in _relative_links(page):
            where, _, anchor = target.partition("#")
            dest = (page.parent / where).resolve() if where else page
            if not dest.is_relative_to(REPO):
                broken.append(f"{page.relative_to(REPO)}: {target} points outside the repository")
            elif not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} names no heading of {dest.name}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_in_the_index() -> None:
    index = {(DOCS / t.partition("#")[0]).resolve() for t in _relative_links(DOCS / "README.md")}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.resolve() not in index]
    assert not missing, f"docs pages not listed in docs/README.md: {missing}"
