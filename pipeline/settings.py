"""What one sync needs to know, validated once, before anything touches the network or disk."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import ConfigurationError

DEFAULT_BASE_URL = "https://api.comfycontrol.app"
DEFAULT_DB_PATH = Path("data") / "comfysync.db"
#: Where `comfysync demo` writes its database unless told otherwise.
DEMO_DB_PATH = Path("data") / "demo.db"
DEFAULT_EXPORT_DIR = Path("data") / "exports"
#: Snapshot and export formats; each is also the file suffix and the snapshot tree's top folder.
EXPORT_FORMATS: tuple[str, ...] = ("parquet", "csv")
MAX_PER_PAGE = 100


def is_loopback_host(host: str) -> bool:
    """True for localhost and any address in 127.0.0.0/8 or ::1: places only this machine serves."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """Options of one sync. Construct with keywords; ``validated()`` checks them as a whole.

    ``token`` is excluded from ``repr`` so a settings object can be logged or shown in a
    traceback without leaking the credential. ``export_dir`` None (the default for the Python
    API) writes no snapshots; the ``sync`` command sets it to ``data/exports`` unless
    ``--no-export``.
    """

    base_url: str = DEFAULT_BASE_URL
    token: str | None = field(default=None, repr=False)
    db_path: Path = DEFAULT_DB_PATH
    per_page: int = MAX_PER_PAGE
    concurrency: int = 4
    max_walks: int = 3
    timeout: float = 30.0
    max_retries: int = 5
    allow_http: bool = False
    store_header_values: bool = False
    #: A complete walk that would mark more than this share of the present fleet deleted
    #: applies no deletion (see pipeline.guardrails), unless ``allow_mass_delete``.
    max_delete_ratio: float = 0.5
    allow_mass_delete: bool = False
    retry_wait_initial: float = 0.5
    retry_wait_max: float = 30.0
    retry_after_cap: float = 120.0
    export_dir: Path | None = None
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    keep_snapshots: int | None = None
    csv_safe: bool = False

    def validated(self) -> Settings:
        """Return self after checking every option, or raise ConfigurationError.

        Refuses to send a token in clear text or to an unknown host by mistake: plain
        ``http://`` is only allowed to loopback (the simulator) unless ``allow_http``.
        """
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"--base-url must be an http(s) URL such as {DEFAULT_BASE_URL}, "
                f"not {self.base_url!r}"
            )
        loopback = is_loopback_host(parts.hostname)
        if parts.scheme == "http" and not loopback and not self.allow_http:
            raise ConfigurationError(
                f"refusing plain http:// to {parts.hostname}: the token would travel "
                "unencrypted; use https:// or pass --allow-http"
            )
        if not self.token and not loopback:
            raise ConfigurationError("no API token: set COMFYCONTROL_TOKEN or pass --token")
        if not 1 <= self.per_page <= MAX_PER_PAGE:
            raise ConfigurationError(f"--per-page must be between 1 and {MAX_PER_PAGE}")
        if self.concurrency < 1:
            raise ConfigurationError("--concurrency must be at least 1")
        if self.max_walks < 1:
            raise ConfigurationError("--max-walks must be at least 1")
        if self.timeout <= 0:
            raise ConfigurationError("--timeout must be a positive number of seconds")
        if self.max_retries < 0:
            raise ConfigurationError("--max-retries must be 0 or more")
        unknown = sorted(set(self.export_formats) - set(EXPORT_FORMATS))
        if unknown or not self.export_formats:
            raise ConfigurationError(
                f"--format must be one or more of {', '.join(EXPORT_FORMATS)}, "
                f"not {', '.join(unknown) or 'nothing'}"
            )
        if self.keep_snapshots is not None and self.keep_snapshots < 1:
            raise ConfigurationError("--keep-snapshots must be at least 1")
        if not 0.0 <= self.max_delete_ratio <= 1.0:
            raise ConfigurationError("--max-delete-ratio must be between 0 and 1")
        return self


def env_db_path() -> Path:
    """The database path from COMFYSYNC_DB, or the default under data/."""
    return Path(os.environ.get("COMFYSYNC_DB") or DEFAULT_DB_PATH)
