from __future__ import annotations

import pickle

import pytest

from config.errors import ConfigError, IhcAdapterError, SlideReadError


def test_messages_name_file_parameter_and_value() -> None:
    e = SlideReadError("/data/a.svs", "file is truncated")
    assert str(e) == "/data/a.svs: file is truncated" and e.path == "/data/a.svs"
    c = ConfigError("nuclei.threshold", -1, "must be positive")
    assert str(c) == "nuclei.threshold=-1: must be positive"
    with pytest.raises(IhcAdapterError, match=r"^nuclei\.threshold=-1"):
        raise c


@pytest.mark.parametrize(
    "error",
    [SlideReadError("/data/a.svs", "file is truncated"), ConfigError("nuclei.threshold", -1, "must be positive")],
)
def test_errors_survive_pickling(error: IhcAdapterError) -> None:
    # How an error raised in a tile worker process reaches the caller.
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.__dict__ == error.__dict__
