from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import ConfigError
from config.service import load_service_config

EXAMPLE = """
[paths]
spool = "/tmp/spool"
output = "/tmp/out"

[scoring]
profile = "ki67"
overrides = ["nuclei.threshold=0.12"]

[scp]
ae_title = "IHC"
port = 11113
allowed_calling_aes = ["SCANNER1", "PACS"]

[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = 4242
ae_title = "ORTHANC"
"""


def test_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "adapter.toml"
    f.write_text(EXAMPLE)
    c = load_service_config(f, {"IHC_ADAPTER__SCP__PORT": "11199", "IHC_ADAPTER__SERVICE__CONCURRENCY": "2"})
    assert c.scp.port == 11199 and c.service.concurrency == 2
    assert c.scp.allowed_calling_aes == ("SCANNER1", "PACS")
    assert c.destinations[0].ae_title == "ORTHANC" and c.paths.database == Path("/tmp/spool/jobs.db")
    assert c.scoring.overrides == ("nuclei.threshold=0.12",)


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        ({"IHC_ADAPTER__SCP__PORT": "70000"}, r"scp\.port=70000: .*less than or equal to 65535"),
        ({"IHC_ADAPTER__SCP__AE_TITLE": '"A_VERY_LONG_AE_TITLE_X"'}, r"scp\.ae_title=.*1-16 printable"),
        ({"IHC_ADAPTER__WATCH__AFTER": "move"}, r"needs watch\.done_folder"),
        ({"IHC_ADAPTER__SCP__COLOUR": "red"}, r"scp\.colour=.*[Ee]xtra"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, env: dict[str, str], pattern: str) -> None:
    f = tmp_path / "adapter.toml"
    f.write_text(EXAMPLE)
    with pytest.raises(ConfigError, match=pattern):
        load_service_config(f, env)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config=.*nope\.toml.*cannot read"):
        load_service_config(tmp_path / "nope.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[scp\nport=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_service_config(bad, {})
