"""Bounds on the numbers in a release policy, checked before a policy is stored.

Every number in a policy ends up in a licence that the worker parses as a 64-bit
integer, in a database column or in arithmetic on Unix times: a `query_budget` of
2^64 + 5 was once accepted, after which no worker could start. Out-of-range numbers are
refused with 422 ``policy_out_of_range`` naming the field and its range.
"""

from __future__ import annotations

from typing import Any

INT63 = 2**63 - 1  # the largest signed 64-bit integer
YEAR_9999 = 253_402_300_799  # 9999-12-31T23:59:59Z, the last time a Unix date prints as

# Top-level policy fields: (lowest, highest) allowed.
BOUNDS: dict[str, tuple[int, int]] = {
    "expires_at": (0, YEAR_9999),
    "max_clients": (1, 1_000_000_000),
    "licence_ttl": (1, 366 * 86400),
    "query_budget": (1, INT63),
    "client_budget": (1, INT63),
    "budget_slice": (1, INT63),
}


class OutOfRange(ValueError):
    def __init__(self, where: str, lo: int, hi: int) -> None:
        super().__init__(f"policy.{where} must be an integer from {lo} to {hi}")
        self.where = where


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_policy_bounds(policy: dict[str, Any]) -> None:
    """Raise `OutOfRange` for the first number outside its range: the fields in
    `BOUNDS`, and any other integer anywhere in the policy (nested sections included)
    outside the signed 64-bit range."""
    for name, (lo, hi) in BOUNDS.items():
        v = policy.get(name)
        if _is_int(v) and not lo <= v <= hi:
            raise OutOfRange(name, lo, hi)

    def walk(v: Any, where: str) -> None:
        if _is_int(v) and not -INT63 - 1 <= v <= INT63:
            raise OutOfRange(where, -INT63 - 1, INT63)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{where}.{k}" if where else str(k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")

    walk(policy, "")
