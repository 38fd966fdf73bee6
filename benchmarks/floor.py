"""The floor: fetch every page with httpx at a given concurrency and parse the JSON, nothing more.

This is what any tool must at least do, so comfysync's timings are reported as ratios to it,
measured in the same run on the same machine. It uses httpx's own ``response.json()``, as a
hand-written script would.
"""

from __future__ import annotations

import argparse
import asyncio
import math

import httpx


async def fetch_all(base_url: str, token: str, concurrency: int, per_page: int) -> int:
    """Fetch every page (page 1 first for ``total``, then the rest); return runners parsed."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:

        async def page(number: int) -> dict[str, object]:
            response = await client.get("/v1/runner", params={"page": number, "per_page": per_page})
            response.raise_for_status()
            body: dict[str, object] = response.json()
            return body

        first = await page(1)
        total = int(first["total"])  # type: ignore[call-overload]
        pending = iter(range(2, max(1, math.ceil(total / per_page)) + 1))
        seen = len(first["runners"])  # type: ignore[arg-type]

        async def worker() -> None:
            nonlocal seen
            for number in pending:
                body = await page(number)  # awaited first: `seen += await ...` loses updates
                seen += len(body["runners"])  # type: ignore[arg-type]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token", default="bench-token")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--per-page", type=int, default=100)
    args = parser.parse_args()
    print(asyncio.run(fetch_all(args.base_url, args.token, args.concurrency, args.per_page)))


if __name__ == "__main__":
    main()
