"""The documentation site: every page is in the navigation, every public name in the reference.

``mkdocs build --strict`` (run by .ci/run) catches broken links and docstrings it cannot parse;
these tests catch what it does not: a page left out of the navigation, and a public name missing
from docs/reference.md or without a docstring.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from test_public_api import SURFACE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = (DOCS / "reference.md").read_text()


def _nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))


def _reference_members() -> dict[str, list[str]]:
    """``::: module`` blocks of docs/reference.md and the members each lists."""
    blocks = re.findall(r"^::: ([\w.]+)\n((?:    .*\n)*)", REFERENCE, flags=re.M)
    return {module: re.findall(r"^\s+- (\w+)$", options, flags=re.M) for module, options in blocks}


def test_every_docs_page_is_in_the_navigation() -> None:
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert pages == _nav_pages()


@pytest.mark.parametrize("module_name", [m for m in SURFACE if m != "resilient_voice"])
def test_reference_lists_every_public_name(module_name: str) -> None:
    assert _reference_members().get(module_name) == SURFACE[module_name]


def test_reference_names_the_root_reexports() -> None:
    root = REFERENCE[REFERENCE.index("## `resilient_voice`") :].split("\n## ", 1)[0]
    for name in SURFACE["resilient_voice"]:
        assert f"`{name}`" in root, name


def test_every_public_name_has_a_docstring() -> None:
    import griffe

    package = griffe.load("resilient_voice", search_paths=[str(ROOT / "src")])
    missing = []
    for module_name, names in SURFACE.items():
        importlib.import_module(module_name)
        path = module_name.removeprefix("resilient_voice").removeprefix(".")
        module = package[path] if path else package
        for name in names:
            docstring = module[name].docstring
            if docstring is None or not docstring.value.strip():
                missing.append(f"{module_name}.{name}")
    assert missing == []


def test_testing_page_shows_every_fault_constructor() -> None:
    from resilient_voice.testing import Fault

    page = (DOCS / "testing.md").read_text()
    constructors = [
        name
        for name, value in vars(Fault).items()
        if isinstance(value, classmethod) and not name.startswith("_")
    ]
    assert len(constructors) >= 8
    assert [name for name in constructors if f"Fault.{name}(" not in page] == []
