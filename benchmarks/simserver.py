"""The simulator as its own process for benchmarks, optionally pre-churned.

``python -m benchmarks.simserver --runners 100000 --port 8811 --updates 1000 --creates 100
--deletes 100`` serves the seeded account after applying that churn, so a store synced against
the plain account sees exactly 1% updated, 0.1% created and 0.1% deleted runners.
"""

from __future__ import annotations

import argparse

from pipeline.sim.faults import FaultPlan
from pipeline.sim.simulator import SimulatedAccount, serve


def build_account(
    *, runners: int, seed: int, token: str, latency_ms: float, updates: int, creates: int,
    deletes: int,
) -> SimulatedAccount:
    """The seeded account with deterministic churn: updates and deletes spread over the fleet."""
    account = SimulatedAccount(
        runners=runners, seed=seed, token=token, faults=FaultPlan(latency_ms=latency_ms)
    )
    ids = account.runner_ids()
    stride = max(1, len(ids) // max(1, updates + deletes))
    targets = ids[::stride]
    for runner_id in targets[:updates]:
        account.rename_runner(runner_id, account.get_runner(runner_id)["name"] + " v2")
    for runner_id in targets[updates : updates + deletes]:
        account.delete_runner(runner_id)
    for number in range(creates):
        account.create_runner(name=f"bench-new-{number}")
    return account


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark server: its account, its churn, its port and latency."""
    parser.add_argument("--runners", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="bench-token")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--updates", type=int, default=0)
    parser.add_argument("--creates", type=int, default=0)
    parser.add_argument("--deletes", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_server_options(parser)
    args = parser.parse_args()
    account = build_account(
        runners=args.runners, seed=args.seed, token=args.token, latency_ms=args.latency_ms,
        updates=args.updates, creates=args.creates, deletes=args.deletes,
    )
    serve(account, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
