"""The error every configuration check raises, and the check itself. Imports nothing, so that every module of the
library (config, the family registry, memory placement) can use it without importing another."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value or key a user can fix. The message names the field and what is allowed."""


def check(ok: bool, path: str, value: Any, allowed: str) -> None:
    """Raise ConfigError '<path>: invalid value <value>; allowed: <allowed>' unless `ok`."""
    if not ok:
        raise ConfigError(f"{path}: invalid value {value!r}; allowed: {allowed}")


__all__ = ["ConfigError", "check"]
