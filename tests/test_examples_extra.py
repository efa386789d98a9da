"""``pip install -e '.[examples]'`` installs everything the examples import and use.

The test suite runs the examples in the dev environment, which has every package, so a package
missing from the ``examples`` extra only shows when a reader follows the tutorial: FastAPI and
Starlette read a form body (Twilio's status callbacks) only with python-multipart installed,
and answer 500 to every callback without it. This reads the examples' imports and the extra's
requirements and compares them, with no install.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What an example uses without importing it: the package a framework loads on demand. Starlette
# (and FastAPI on it) parses form bodies with python-multipart; Litestar has its own parser.
FORM = re.compile(r"\.form\(\)")
FORM_PARSER_NEEDED_BY = {"fastapi", "starlette"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _extra(name: str) -> set[str]:
    """The distributions an extra brings (its own, those of the extras it names, the core)."""
    found = {_name(req) for req in PROJECT["dependencies"]}
    for requirement in PROJECT["optional-dependencies"][name]:
        if (nested := re.fullmatch(r"resilient-voice\[([\w,]+)\]", requirement)) is not None:
            for inner in nested[1].split(","):
                found |= _extra(inner)
        else:
            found.add(_name(requirement))
    return found


def _imported_distributions(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"resilient_voice", "__future__"}
    by_module = packages_distributions()
    return {
        dist.lower().replace("_", "-")
        for module in modules
        for dist in by_module.get(module, [module])
    }


def test_the_examples_extra_brings_what_the_examples_need() -> None:
    brings = _extra("examples")
    missing = set()
    for example in sorted((ROOT / "examples").glob("*.py")):
        source = example.read_text()
        needs = _imported_distributions(source)
        if FORM.search(source) and needs & FORM_PARSER_NEEDED_BY:
            needs.add("python-multipart")
        missing |= {f"{example.name}: {dist}" for dist in needs - brings}
    assert missing == set()
