"""sqlite-utils, imported without the pandas and numpy it would otherwise load.

sqlite-utils imports pandas and numpy whenever they are installed, only to map their scalar
types to column types, which comfysync never asks of it. With pandas installed (it is one of
our dependencies) that would add their start-up time and memory to every sync. Every
module takes ``Database`` and ``Migrations`` from here instead of from sqlite_utils, so the
import happens once, lean. pandas itself stays importable afterwards (``pipeline.read.frames``,
exports): only sqlite-utils' optional type mapping is skipped.
"""

from __future__ import annotations

import sys

_OPTIONAL = ("pandas", "numpy")


def _import_without_optional_dependencies() -> None:
    if "sqlite_utils.db" in sys.modules:
        return
    blocked = [name for name in _OPTIONAL if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        import sqlite_utils  # noqa: F401
    finally:
        for name in blocked:
            if sys.modules.get(name) is None:
                del sys.modules[name]


_import_without_optional_dependencies()

from sqlite_utils import Database  # noqa: E402
from sqlite_utils.migrations import Migrations  # noqa: E402

__all__ = ["Database", "Migrations"]
