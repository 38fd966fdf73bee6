"""What one sync needs to know, validated once, before anything touches the network or disk."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pipeline.errors import ConfigurationError
from pipeline.source.records import TRACKED_FIELDS
from pipeline.store.keyfile import check_env_key

if TYPE_CHECKING:  # the CLI's --help loads no object-store code
    from pipeline.outputs.objects import ObjectPath

DEFAULT_BASE_URL = "https://api.comfycontrol.app"
DEFAULT_DB_PATH = Path("data") / "comfysync.db"
#: Where `comfysync demo` writes its database unless told otherwise.
DEMO_DB_PATH = Path("data") / "demo.db"
DEFAULT_EXPORT_DIR = Path("data") / "exports"
#: Snapshot and export formats; each is also the file suffix and the snapshot tree's top folder.
EXPORT_FORMATS: tuple[str, ...] = ("parquet", "csv")
#: When a sync writes its snapshot files (``--snapshot``): only when they would differ from
#: the latest ones (``changed``: see ``pipeline.sync.run``), or after every sync (``always``).
SNAPSHOT_WHEN: tuple[str, ...] = ("changed", "always")
MAX_PER_PAGE = 100
#: When to notify (``--notify-on``) and which changes a change notice reports
#: (``--notify-changes``; ``disabled``: a runner whose status became disabled).
NOTIFY_EVENTS: tuple[str, ...] = ("failure", "recovery", "changes")
CHANGE_KINDS: tuple[str, ...] = ("created", "updated", "deleted", "restored", "disabled")
#: How ``--ping-url`` is called: Healthchecks' /start and /fail, or an Uptime Kuma push URL.
PING_STYLES: tuple[str, ...] = ("healthchecks", "uptime-kuma")

#: One DNS label (letters, digits, hyphens; underscores too, which some private names use).
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
#: What an HTTP header can carry as it is: visible ASCII, no spaces or control characters.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def is_loopback_host(host: str) -> bool:
    """True for localhost and any address in 127.0.0.0/8 or ::1: places only this machine serves."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_blank_path(value: str, option: str, *, required: bool = False) -> None:
    """Raise ConfigurationError if ``value``, given for ``option``, is empty or blank.

    An empty path would quietly mean the current folder (``Path("")`` is ``.``), so the
    command line checks the text before turning it into a path.
    """
    if not value.strip():
        default = "" if required else ", or leave the option out for its default"
        raise ConfigurationError(f"{option} is empty: pass a path{default}")


def _export_dir_problem(export_dir: Path, db_path: Path) -> str | None:
    """Why ``export_dir`` cannot hold snapshot files beside ``db_path``, or None."""
    for folder in (*reversed(export_dir.parents), export_dir):
        if folder.exists() and not folder.is_dir():
            return (
                f"--export-dir {export_dir} is a file, not a folder; pass a folder for the "
                "snapshot files (or --no-export)"
                if folder == export_dir
                else f"--export-dir {export_dir} is under {folder}, which is a file, not a "
                "folder; pass a folder for the snapshot files (or --no-export)"
            )
    database = db_path.resolve()
    target = export_dir.resolve()
    if target == database or database in target.parents:
        return (
            f"--export-dir {export_dir} is the database (--db {db_path}) or inside it; "
            "pass a folder of its own for the snapshot files"
        )
    return None


def _check_endpoint(url: str) -> None:
    """Refuse an ``--s3-endpoint-url`` that is not an http(s) URL of a host (and port)."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
        parts = urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or any(char.isspace() or not char.isprintable() for char in url)
    ):
        raise ConfigurationError(
            f"--s3-endpoint-url {url!r} is not an http(s) URL of a store, such as "
            "https://minio.internal:9000"
        )


@dataclass(frozen=True)
class Settings:
    """Options of one sync. Construct with keywords; ``validated()`` checks them as a whole.

    ``token`` and ``redaction_key`` are excluded from ``repr`` so a settings object can be
    logged or shown in a traceback without leaking a secret. ``redaction_key`` (hex, what
    COMFYSYNC_REDACTION_KEY holds) None means the key file beside the database
    (``pipeline.store.keyfile``). ``export_dir`` None (the default for the Python
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
    #: applies no deletion (see pipeline.sync.guardrails), unless ``allow_mass_delete``.
    max_delete_ratio: float = 0.5
    allow_mass_delete: bool = False
    retry_wait_initial: float = 0.5
    retry_wait_max: float = 30.0
    #: A server asking (Retry-After) for a longer wait fails the page at once instead.
    max_retry_after: float = 60.0
    #: A local folder, or an object-store folder (``s3://bucket/prefix``).
    export_dir: Path | ObjectPath | None = None
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    keep_snapshots: int | None = None
    #: One of SNAPSHOT_WHEN.
    snapshot: str = "changed"
    csv_safe: bool = False
    redaction_key: str | None = field(default=None, repr=False)
    #: The configuration file's account this sync is for (``pipeline.config``): its snapshots
    #: go to the ``account=NAME`` partition. None: the single-account layout.
    account: str | None = None
    #: What a sync tells the outside world (``pipeline.observe``, which the CLI and the
    #: scheduler sync through; ``run_sync`` itself ignores them). The URLs carry credentials,
    #: hence out of ``repr``.
    notify: tuple[str, ...] = field(default=(), repr=False)
    notify_on: tuple[str, ...] = ("failure", "recovery")
    notify_after_failures: int = 1
    notify_changes: tuple[str, ...] = CHANGE_KINDS
    notify_fields: tuple[str, ...] = ()
    ping_url: str | None = field(default=None, repr=False)
    ping_style: str = "healthchecks"
    metrics_file: Path | None = None
    #: An S3-compatible store's endpoint (MinIO, R2) for ``s3://`` export and warehouse URLs.
    s3_endpoint_url: str | None = None
    #: The Iceberg catalog to commit each sync to (``pipeline.outputs.iceberg``), its
    #: warehouse (None: ``iceberg`` beside the database) and the ``account`` the rows carry
    #: (None: the configuration file's account, else the database's own identifier).
    iceberg: str | None = field(default=None, repr=False)  # a catalog URI may hold a password
    iceberg_warehouse: str | None = None
    iceberg_account: str | None = None

    def validated(self) -> Settings:
        """Return self after checking every option, or raise ConfigurationError.

        Refuses to send a token in clear text or to an unknown host by mistake: plain
        ``http://`` is only allowed to loopback (the simulator) unless ``allow_http``. Refuses
        an ``export_dir`` that is blank, a file (or under one), or the database itself,
        before the sync creates anything.
        """
        from pipeline.source.client import check_request_url  # httpx stays out of `--help`

        hostname = _base_url_host(self.base_url)
        check_request_url(self.base_url)
        parts = urlsplit(self.base_url)
        loopback = is_loopback_host(hostname)
        if parts.scheme == "http" and not loopback and not self.allow_http:
            raise ConfigurationError(
                f"refusing plain http:// to {parts.hostname}: the token would travel "
                "unencrypted; use https:// or pass --allow-http"
            )
        if not self.token and not loopback:
            raise ConfigurationError("no API token: set COMFYCONTROL_TOKEN or pass --token")
        if self.token and not _TOKEN.fullmatch(self.token):
            # Never quoted: it is the secret. A stray newline from `$(cat file)` is the usual cause.
            raise ConfigurationError(
                "the API token has spaces, line breaks or other characters a token never has; "
                "check COMFYCONTROL_TOKEN (or --token)"
            )
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
        if not 0 <= self.max_retry_after < math.inf:  # also refuses NaN
            raise ConfigurationError(
                "--max-retry-after must be a finite number of seconds, 0 or more"
            )
        unknown = sorted(set(self.export_formats) - set(EXPORT_FORMATS))
        if unknown or not self.export_formats:
            raise ConfigurationError(
                f"--format must be one or more of {', '.join(EXPORT_FORMATS)}, "
                f"not {', '.join(unknown) or 'nothing'}"
            )
        if self.keep_snapshots is not None and self.keep_snapshots < 1:
            raise ConfigurationError("--keep-snapshots must be at least 1")
        if self.snapshot not in SNAPSHOT_WHEN:
            raise ConfigurationError(
                f"--snapshot must be one of {', '.join(SNAPSHOT_WHEN)}, not {self.snapshot!r}"
            )
        if not 0.0 <= self.max_delete_ratio <= 1.0:
            raise ConfigurationError("--max-delete-ratio must be between 0 and 1")
        refuse_blank_path(str(self.db_path), "--db")
        if isinstance(self.export_dir, Path):
            refuse_blank_path(str(self.export_dir), "--export-dir")
            problem = _export_dir_problem(self.export_dir, self.db_path)
            if problem is not None:
                raise ConfigurationError(problem)
        if self.redaction_key is not None:
            check_env_key(self.redaction_key)
        self._check_observing()
        self._check_lake()
        return self

    def _check_lake(self) -> None:
        """Refuse object-store and Iceberg options that could only fail after the sync."""
        import importlib.util

        needs = []
        if self.export_dir is not None and not isinstance(self.export_dir, Path):
            needs.append(("s3fs", f"--export-dir {self.export_dir}"))
        if self.iceberg is not None:
            if "://" not in self.iceberg:
                raise ConfigurationError(
                    f"--iceberg {self.iceberg!r} is not a catalog URI; pass e.g. "
                    "sqlite:///data/catalog.db or a REST catalog's https:// URL"
                )
            needs.append(("pyiceberg", "--iceberg"))
        if self.iceberg_account is not None and not self.iceberg_account.strip():
            raise ConfigurationError("--iceberg-account is empty: pass a name")
        if self.iceberg_warehouse is not None:
            from pipeline.outputs.objects import ObjectPath, is_url

            if is_url(self.iceberg_warehouse):
                ObjectPath.parse(self.iceberg_warehouse)  # refuses a URL without a bucket
            else:
                refuse_blank_path(self.iceberg_warehouse, "--iceberg-warehouse")
        if self.s3_endpoint_url is not None:
            _check_endpoint(self.s3_endpoint_url)
        for module, option in needs:
            if importlib.util.find_spec(module) is None:
                raise ConfigurationError(
                    f"{option} needs the lake extra: pip install 'comfysync[lake]'"
                )

    def _check_observing(self) -> None:
        """Refuse a notification or ping option that could only fail later, unattended."""
        for option, given, known in (
            ("--notify-on", self.notify_on, NOTIFY_EVENTS),
            ("--notify-changes", self.notify_changes, CHANGE_KINDS),
            ("--notify-fields", self.notify_fields, TRACKED_FIELDS),
            ("--ping-style", (self.ping_style,), PING_STYLES),
        ):
            unknown = [value for value in given if value not in known]
            if unknown:
                raise ConfigurationError(
                    f"{option} takes {', '.join(known)}; not {', '.join(map(repr, unknown))}"
                )
        if self.notify_after_failures < 1:
            raise ConfigurationError("--notify-after-failures must be at least 1")
        if self.ping_url is not None:
            from pipeline.source.client import is_requestable_url

            if not is_requestable_url(self.ping_url):
                # Not quoted: a ping URL is a credential.
                raise ConfigurationError(
                    "--ping-url (COMFYSYNC_PING_URL) must be an http(s) URL such as "
                    "https://hc-ping.com/<uuid>"
                )
        if self.metrics_file is not None:
            refuse_blank_path(str(self.metrics_file), "--metrics-file")


def _base_url_host(url: str) -> str:
    """The host of ``--base-url``, or ConfigurationError saying what is wrong with the URL.

    Everything a request URL cannot carry is refused here, before anything starts: a bad
    port or IPv6 bracket, spaces, a user name or password (the token goes in a header), a
    query or fragment (the page parameters are appended to the URL). The URL is quoted in
    the message only when it cannot hold a password.
    """
    wanted = f"--base-url must be an http(s) URL such as {DEFAULT_BASE_URL}"
    if "@" in url.partition("://")[2].split("/", 1)[0]:
        raise ConfigurationError(
            "--base-url must not contain a user name or password; pass the token with "
            "COMFYCONTROL_TOKEN (or --token)"
        )
    shown = url if len(url) <= 80 else url[:70] + "..."
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ConfigurationError(f"{wanted}, without spaces or control characters: {shown!r}")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0-65535
        hostname = parts.hostname
    except ValueError:
        raise ConfigurationError(
            f"{wanted}; {shown!r} has a bad port (1-65535) or unbalanced [brackets] around "
            "an IPv6 address"
        ) from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigurationError(f"{wanted}, not {shown!r}")
    if "?" in url or "#" in url:
        raise ConfigurationError(f"{wanted} with no ?query or #fragment, not {shown!r}")
    if port == 0:
        raise ConfigurationError(f"{wanted}; the port in {shown!r} must be 1-65535")
    if not _is_host_name(hostname, bracketed="[" in parts.netloc):
        raise ConfigurationError(f"{wanted}; {hostname!r} is not a host name or IP address")
    return hostname


def _is_host_name(host: str, *, bracketed: bool) -> bool:
    """True for an IP address (IPv6 only in brackets) or a DNS name an HTTP client can look up."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None or bracketed:
        return address is not None and bracketed == (address.version == 6)
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.removesuffix(".").split(".")
    return len(ascii_host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
