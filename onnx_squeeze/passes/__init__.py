"""Compression passes. Each module registers its pass classes with :func:`base.register`.

Modules are imported on demand (:func:`load_all`), so the CLI starts fast and a new pass only
needs a new module in this folder.
"""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every pass module in this package so that all passes are registered."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
