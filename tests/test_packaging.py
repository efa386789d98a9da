"""The sdist and the wheel carry the LICENSE, and the sdist leaves CI's own files out.

Built offline (``python -m build --no-isolation``) with the ``build`` and ``hatchling`` of the
test environment, both in the ``dev`` extra, so the test needs no network.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import build  # noqa: F401
    import hatchling  # noqa: F401

    outdir = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return outdir


@pytest.mark.slow
def test_sdist_has_the_license_and_not_ci(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    assert "LICENSE" in names
    assert "pyproject.toml" in names
    assert not [name for name in names if name == ".ci" or name.startswith(".ci/")]


@pytest.mark.slow
def test_wheel_has_the_license(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "resilient_voice/py.typed" in names
