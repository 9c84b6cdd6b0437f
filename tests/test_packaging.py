"""The container recipe: pinned base image, hashed lock, nothing of the build or the tests in the runtime image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stages(dockerfile: str) -> list[str]:
    return re.split(r"^FROM ", dockerfile, flags=re.M)[1:]


def test_base_image_is_pinned_by_digest() -> None:
    text = (ROOT / "Dockerfile").read_text()
    [default] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", default)
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in _stages(text))


def test_packages_come_from_the_hashed_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in text
    assert "pip install --no-cache-dir --no-deps ." in text  # the project adds no unhashed dependency
    lock = (ROOT / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock, flags=re.M))
    blocks = re.split(r"^(?=[A-Za-z0-9_.\-]+==)", lock, flags=re.M)[1:]
    assert len(blocks) == len(pins) and all("--hash=sha256:" in block for block in blocks)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    normalise = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    locked = {normalise(name) for name in pins}
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
        assert name and normalise(name.group(0)) in locked, f"{requirement} is not in requirements.lock"
    assert pins["torch"] == "2.13.0"


def test_the_runtime_image_has_no_validators_and_no_build_arguments() -> None:
    runtime = _stages((ROOT / "Dockerfile").read_text())[-1]
    assert "dcmtk" not in runtime and "dicom3tools" not in runtime and "apt-get install" not in runtime
    assert "ARG " not in runtime and "PIP_INDEX_URL" not in runtime and "PIP_EXTRA_INDEX_URL" not in runtime
    assert "COPY --from=build /opt/ihc-adapter /opt/ihc-adapter" in runtime
    assert "USER ihc" in runtime
