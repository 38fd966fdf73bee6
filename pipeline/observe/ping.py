"""Dead man's switch pings: tell a monitor a sync started, succeeded or failed.

Healthchecks style (``--ping-style healthchecks``, the default): ``URL/start`` when a sync
starts, ``URL`` when it ends ``success`` or ``partial``, ``URL/fail`` when it fails, each a
POST whose body is the one-line outcome. Uptime Kuma push monitors take one URL and a status
in the query: ``URL?status=up&msg=...`` or ``status=down``; they have no start signal. A monitor
that hears nothing within its grace period raises the alarm itself, which also covers a
machine that is off. Pings have short timeouts; a failed ping is a warning, never an error.
A ping URL is a credential (Healthchecks' UUID, a Kuma push token): it is only shown masked.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from pipeline.printable import printable

#: Seconds a ping may take, all told: a ping must never hold up a sync.
PING_TIMEOUT = 5.0
#: The longest outcome line a ping carries: far more than one line needs, and well within
#: what Healthchecks keeps of a body (a query string has less room still).
MAX_BODY = 1000


def masked_url(url: str) -> str:
    """``url`` with everything after the host hidden: safe to log."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/***"


def send_ping(url: str, signal: str, line: str, *, style: str = "healthchecks") -> str | None:
    """Ping ``url`` with ``signal`` (``start``, ``success`` or ``fail``) and the outcome line.

    Returns None once the monitor accepted it, else a warning saying which ping failed.
    """
    body = printable(line)[:MAX_BODY]
    try:
        if style == "uptime-kuma":
            if signal == "start":
                return None  # Kuma push monitors know only up and down
            params = {"status": "down" if signal == "fail" else "up", "msg": body[:250]}
            response = httpx.get(url, params=params, timeout=PING_TIMEOUT)
        else:
            target = url if signal == "success" else f"{url.rstrip('/')}/{signal}"
            response = httpx.post(target, content=body.encode(), timeout=PING_TIMEOUT)
    except Exception as exc:  # a ping must never fail the sync, whatever goes wrong
        return f"{signal} ping to {masked_url(url)} failed ({type(exc).__name__})"
    if response.is_success:
        return None
    return f"{signal} ping to {masked_url(url)} failed (HTTP {response.status_code})"
