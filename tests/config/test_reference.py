from __future__ import annotations

from pathlib import Path

import pytest

from adapter.cli import main
from config.reference import reference
from config.service import ServiceConfig
from config.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_reference_is_what_the_models_generate() -> None:
    assert DOC.read_text() == reference(), "run: ihc-adapter config reference > docs/configuration.md"


def test_every_setting_is_in_the_reference_with_its_default_and_a_meaning() -> None:
    text = reference()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert "| `nuclei.threshold` | number | `0.1` |" in rows["nuclei.threshold"]
    assert rows["scp.port"].startswith("| `scp.port` | integer | `11112` |")
    for name in ("nuclei.adaptive_threshold", "tissue.max_od", "retention.keep_days", "destinations[].host"):
        assert name in rows, name
    empty = [name for name, line in rows.items() if line.rstrip().endswith("|  |")]
    assert not empty, f"settings without a description: {empty}"
    leaves = _leaves(Settings, "") + _leaves(ServiceConfig, "")
    assert set(leaves) <= set(rows), sorted(set(leaves) - set(rows))


def _leaves(model: type, prefix: str) -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{prefix}{name}.")
        elif name != "destinations":
            out.append(f"{prefix}{name}")
    return out


def test_the_cli_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == reference()
