"""Names a package imports on first use (PEP 562), so that importing the package stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(namespace: dict[str, Any], names: dict[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for the package whose ``globals()`` is ``namespace``: ``names`` maps an attribute
    to the submodule it comes from; the value is imported on first access and kept in ``namespace``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
