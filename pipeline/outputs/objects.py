"""Object storage (``s3://bucket/prefix``, and the other fsspec URLs) for the snapshot tree.

An object store has no folders and no rename: a key is written whole by one PUT (or one
multipart upload, which only becomes visible when it completes), so a reader sees the
complete object or nothing, without the temporary-file-and-rename of a local folder.
Credentials come from the store's own chain (for S3: the AWS environment variables, the
shared profile, an instance role); ``endpoint_url`` points at an S3-compatible store
(MinIO, R2, a test server).

Only ``pipeline/outputs/snapshot.py`` (the owner of the layout) calls this module; fsspec
and s3fs are imported inside its functions, so commands that never touch a bucket never
load them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import ConfigurationError

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: Schemes whose endpoint ``--s3-endpoint-url`` sets.
S3_SCHEMES = ("s3", "s3a")


def is_url(text: str) -> bool:
    """Whether ``text`` names an object-store location (``scheme://...``), not a local path."""
    return _URL.match(text) is not None


@dataclass(frozen=True)
class ObjectPath:
    """A key (or a key prefix: a "folder") in an object store, shaped like a ``PurePath``.

    ``parent``, ``name``, ``parents``, ``parts`` and ``/`` work as on a path, so the layout's
    code reads the same for a local folder and a bucket.
    """

    scheme: str
    key: PurePosixPath  # bucket/prefix/...
    endpoint_url: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, url: str, endpoint_url: str | None = None) -> ObjectPath:
        scheme, _, rest = url.partition("://")
        rest = rest.strip("/")
        if not rest or "//" in rest:
            raise ConfigurationError(f"{url} names no bucket and prefix (s3://bucket/prefix)")
        return cls(scheme.lower(), PurePosixPath(rest), endpoint_url)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __truediv__(self, part: str) -> ObjectPath:
        return dataclasses.replace(self, key=self.key / part)

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def parent(self) -> ObjectPath:
        return dataclasses.replace(self, key=self.key.parent)

    @property
    def parents(self) -> tuple[ObjectPath, ...]:
        return tuple(dataclasses.replace(self, key=key) for key in self.key.parents)

    @property
    def parts(self) -> tuple[str, ...]:
        return self.key.parts


def filesystem(location: ObjectPath) -> Any:
    """The fsspec filesystem for ``location``'s scheme (s3fs for ``s3://``).

    ConfigurationError when no installed fsspec implementation knows the scheme.
    """
    import fsspec

    options: dict[str, Any] = {}
    if location.endpoint_url and location.scheme in S3_SCHEMES:
        options["endpoint_url"] = location.endpoint_url
    try:
        return fsspec.filesystem(location.scheme, **options)
    except (ValueError, ImportError) as exc:
        raise ConfigurationError(
            f"cannot write to {location.scheme}:// locations ({exc}); "
            "install comfysync[lake] for s3://"
        ) from exc


def put_file(local: Path, target: ObjectPath) -> int:
    """Upload the complete file ``local`` as ``target`` and return its size in bytes."""
    filesystem(target).put_file(str(local), str(target.key))
    return local.stat().st_size


def list_files(folder: ObjectPath) -> dict[ObjectPath, int]:
    """Every object under ``folder`` with its size; empty when there is none (or no bucket)."""
    fs = filesystem(folder)
    fs.invalidate_cache()  # s3fs caches listings: another process may have written since
    try:
        found = fs.find(str(folder.key), detail=True)
    except FileNotFoundError:
        return {}
    return {
        dataclasses.replace(folder, key=PurePosixPath(name)): int(info.get("size") or 0)
        for name, info in found.items()
        if info.get("type") != "directory"
    }


def size(path: ObjectPath) -> int:
    """The size of the object at ``path`` in bytes."""
    return int(filesystem(path).size(str(path.key)))


def delete_files(paths: list[ObjectPath]) -> None:
    """Delete ``paths`` (one bulk request per thousand keys on S3)."""
    if paths:
        filesystem(paths[0]).rm([str(path.key) for path in paths])


def describe_failure(exc: BaseException) -> str:
    """Why an object-store request failed, in one line without a traceback.

    OSError (s3fs's translation of the store's errors) and botocore's own errors (no such
    endpoint, no credentials) carry a message that names the bucket or the endpoint and no
    secret; anything else only its type.
    """
    if isinstance(exc, OSError) or type(exc).__module__.startswith(("botocore", "aiobotocore")):
        return " ".join(str(exc).split()) or type(exc).__name__
    return f"unexpected {type(exc).__name__} (--debug shows it)"
