"""The one exception type of :mod:`nemo_pp.config`."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem the user can fix: bad YAML, unknown key, bad `_target_`.

    Subclasses ValueError so callers that already catch bad values keep working.
    The message is meant to be printed as is, without a traceback.
    """
