"""One exception base for the whole project.

Every error a user can cause (a bad file, a bad parameter) is an
:class:`IhcAdapterError` whose message names the file or parameter and the
bad value, so the command line can print it as one line instead of a
traceback.
"""

from __future__ import annotations

from os import PathLike


class IhcAdapterError(Exception):
    """Base class of every error ihc-adapter raises on purpose."""


class SlideReadError(IhcAdapterError):
    """A slide cannot be read: unsupported, corrupt, or missing metadata."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(IhcAdapterError):
    """A setting or parameter has a bad value."""

    def __init__(self, parameter: str, value: object, problem: str) -> None:
        self.parameter = parameter
        self.value = value
        self.problem = problem
        super().__init__(f"{parameter}={value!r}: {problem}")
