"""Typed settings, stain profiles and the project's exception hierarchy."""

from config.errors import ConfigError, IhcAdapterError, SlideReadError

__all__ = ["ConfigError", "IhcAdapterError", "SlideReadError"]
