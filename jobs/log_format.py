"""How ``comfysync schedule`` writes its log: timestamped text lines, or one JSON object a line.

A scheduled sync runs unattended for months; its log is how the operator (or a log shipper)
learns what it did. Text lines carry a UTC timestamp, since nothing else may add one; JSON
lines carry the same message plus the record's structured ``fields`` (the run's status,
counts, duration and next run time), so nothing has to be parsed out of prose. A text line
shows its message through ``pipeline.printable`` (upstream text in it cannot forge a line or
drive a terminal); JSON escapes every control character itself.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipeline.printable import printable, printable_lines


def _utc(record: logging.LogRecord) -> str:
    moment = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-11-28T19:05:12.123Z comfysync: INFO: run 1 success: ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} comfysync: {record.levelname}: {printable(record.getMessage())}"
        if record.exc_info:
            line += "\n" + printable_lines(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str) -> None:
    """Send every log record (ours, the sync's, APScheduler's) through the chosen format.

    Our per-run lines are INFO, so ``jobs`` logs at INFO at least. APScheduler's own INFO
    chatter is left out unless --debug; the ticks it skips are logged by the scheduler itself.
    """
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(formatter)
    jobs = logging.getLogger("jobs")
    debug = jobs.isEnabledFor(logging.DEBUG)  # --debug has set it
    jobs.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.INFO if debug else logging.ERROR)
