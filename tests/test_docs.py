"""Every code block of the documentation site runs, or says it is a fragment.

What tests/test_readme.py does for README.md, for every page under docs/: a fenced ``python``
block runs as a script of its own (so it cannot rot), unless the line before it is
``<!-- fragment -->`` (an excerpt that needs names from around it, a framework that is not
installed, a shell command), or ``<!-- excerpt: examples/NAME.py -->``: then it must appear word
for word (at any indentation) in that file, which tests/test_examples.py runs, so the tutorial's
steps cannot drift from the tested app. A block in another language must be marked too: nothing
here runs it. Mermaid diagrams are pictures, not code, and mkdocs renders them.

Two checks read as a new user does, since the suite itself runs with every extra installed: a
runnable block that needs an extra (or the OpenTelemetry SDK) comes after a ``pip install`` that
brings it, and every name any block (fragments included) imports from ``resilient_voice`` exists.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = "<!-- fragment -->"
EXCERPT = re.compile(r"<!-- excerpt: (?P<path>[\w./-]+) -->")
# A fence at the start of a line, with the line before it (a fragment marker or anything else).
FENCE = re.compile(r"^(?P<before>[^\n]*)\n```(?P<lang>[\w-]*)\n(?P<code>.*?)^```$", re.M | re.S)


class Block(NamedTuple):
    page: str
    line: int
    lang: str
    code: str
    fragment: bool
    excerpt_of: str | None


def _blocks() -> list[Block]:
    blocks = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = "\n" + page.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start("lang")].count("\n")
            blocks.append(
                Block(
                    page.relative_to(ROOT).as_posix(),
                    line,
                    match["lang"],
                    match["code"],
                    match["before"].strip() == FRAGMENT,
                    excerpt["path"]
                    if (excerpt := EXCERPT.fullmatch(match["before"].strip()))
                    else None,
                )
            )
    return blocks


BLOCKS = _blocks()
RUNNABLE = [
    block
    for block in BLOCKS
    if block.lang == "python" and not block.fragment and block.excerpt_of is None
]
EXCERPTS = [block for block in BLOCKS if block.excerpt_of is not None]


def test_the_docs_have_runnable_blocks() -> None:
    assert len(RUNNABLE) >= 15


def test_every_block_that_does_not_run_is_marked() -> None:
    unmarked = [
        f"{block.page}:{block.line} ({block.lang or 'no language'})"
        for block in BLOCKS
        if block.lang not in {"python", "mermaid"} and not block.fragment
    ]
    assert unmarked == []


def test_the_tutorial_is_made_of_excerpts() -> None:
    assert len([block for block in EXCERPTS if block.page == "docs/tutorial.md"]) >= 10


@pytest.mark.parametrize("block", EXCERPTS, ids=[f"{b.page}:{b.line}" for b in EXCERPTS])
def test_excerpt_is_in_its_file(block: Block) -> None:
    assert block.excerpt_of is not None
    source = (ROOT / block.excerpt_of).read_text()
    found = any(textwrap.indent(block.code, " " * indent) in source for indent in range(0, 17, 4))
    assert found, f"{block.page}:{block.line} is not in {block.excerpt_of} any more"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.page}:{b.line}" for b in RUNNABLE])
def test_docs_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, f"{block.page}:{block.line}\n{result.stderr}"


# What a block needs beyond the core install, by what it imports: an extra of the package, or a
# package the library leaves to the application. A reader who runs only the install command the
# page shows gets a ModuleNotFoundError at the first line of the example otherwise.
NEEDS = {
    "testing": re.compile(r"from resilient_voice\.testing import [^\n]*\bserve\b"),
    "twilio": re.compile(r"^\s*(from twilio\b|import twilio\b)", re.M),
    "otel": re.compile(r"resilient_voice\.otel\b"),
    "opentelemetry-sdk": re.compile(r"\bopentelemetry\.sdk\b"),
}
INSTALL = re.compile(r"pip install [^\n`]*")


def _installs_named(text: str) -> set[str]:
    """The extras and packages named by the ``pip install`` commands in ``text``."""
    named = set()
    for command in INSTALL.findall(text):
        for extras in re.findall(r"resilient-voice\[([\w,]+)\]", command):
            named.update(extras.split(","))
        named.update(re.findall(r"\b(opentelemetry-sdk)\b", command))
    if "all" in named:
        named.update({"testing", "twilio", "otel", "redis", "demo"})
    return named


def _pages_for_new_users() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize(
    "page", _pages_for_new_users(), ids=lambda page: page.relative_to(ROOT).as_posix()
)
def test_a_runnable_example_says_what_to_install_before_it(page: Path) -> None:
    text = "\n" + page.read_text()
    missing = []
    for match in FENCE.finditer(text):
        if match["lang"] != "python" or match["before"].strip() == FRAGMENT:
            continue
        if EXCERPT.fullmatch(match["before"].strip()):
            continue
        named = _installs_named(text[: match.start()])
        for need, pattern in NEEDS.items():
            if pattern.search(match["code"]) and need not in named:
                line = text[: match.start("lang")].count("\n")
                missing.append(f"{page.relative_to(ROOT)}:{line} needs {need}")
    assert missing == []


IMPORT_FROM = re.compile(r"^\s*from (resilient_voice[\w.]*) import (\([^)]*\)|[^\n]*)", re.M)


def _imported_names() -> list[tuple[str, str, str]]:
    """(where, module, name) of every ``from resilient_voice... import`` in a Python block."""
    found = []
    for page in _pages_for_new_users():
        text = "\n" + page.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] != "python":
                continue
            line = text[: match.start("lang")].count("\n")
            for imported in IMPORT_FROM.finditer(match["code"]):
                names = re.sub(r"#[^\n]*", "", imported[2]).strip("()").split(",")
                found.extend(
                    (f"{page.relative_to(ROOT)}:{line}", imported[1], name)
                    for name in (name.split(" as ")[0].strip() for name in names)
                    if name
                )
    return found


def test_every_name_a_block_imports_exists() -> None:
    """Fragments do not run, but a reader copies their imports: each name must be there."""
    imported = _imported_names()
    assert len(imported) > 100
    missing = []
    for where, module, name in imported:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{where}: from {module} import {name}: {exc}")
    assert missing == []
