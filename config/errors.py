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

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take their own arguments, not the message, so the default
        # pickling (cls(*args)) fails and an error raised in a tile worker would
        # break the pool instead of reaching the caller: rebuild from the message
        # and the attributes.
        return (_rebuild, (type(self), str(self), self.__dict__))


def _rebuild(cls: type[IhcAdapterError], message: str, state: dict[str, object]) -> IhcAdapterError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


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
