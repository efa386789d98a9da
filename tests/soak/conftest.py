"""The reliability campaign: every test here is marked `soak` and sized by `--soak-size`.

`pytest -q` (CI) runs the short size; `pytest -m soak --soak-size full` produces the figures
docs/reliability.md publishes.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/soak/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.soak)
