from __future__ import annotations

import pytest

from config.errors import ConfigError, IhcAdapterError, SlideReadError


def test_messages_name_file_parameter_and_value() -> None:
    e = SlideReadError("/data/a.svs", "file is truncated")
    assert str(e) == "/data/a.svs: file is truncated" and e.path == "/data/a.svs"
    c = ConfigError("nuclei.threshold", -1, "must be positive")
    assert str(c) == "nuclei.threshold=-1: must be positive"
    with pytest.raises(IhcAdapterError, match=r"^nuclei\.threshold=-1"):
        raise c
