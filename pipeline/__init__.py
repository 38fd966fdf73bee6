"""comfysync: an exact, versioned local mirror of a ComfyControl account's runners.

The public Python API is re-exported here lazily, so that importing ``pipeline`` (as the
``comfysync`` command does on every start) costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Settings": "pipeline.settings",
    "SyncSummary": "pipeline.sync.run",
    "run_sync": "pipeline.sync.run",
    "ComfySyncError": "pipeline.errors",
    "RunnerStore": "pipeline.read.frames",
}

__all__ = ["ComfySyncError", "RunnerStore", "Settings", "SyncSummary", "__version__", "run_sync"]

if TYPE_CHECKING:
    from pipeline.errors import ComfySyncError
    from pipeline.read.frames import RunnerStore
    from pipeline.settings import Settings
    from pipeline.sync.run import SyncSummary, run_sync


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
