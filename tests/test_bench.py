"""`ennclave bench` on a bundle with a query budget: it measures without using it up
(before, a short bench exhausted the README example's budget of 100,000)."""

from __future__ import annotations

from ennclave.bench import bench_bundle
from support.enclave_bundle import needs_worker, write_bundle


@needs_worker
def test_bench_spends_at_most_half_the_budget_left(tmp_path):
    b = write_bundle(
        tmp_path / "b", tmp_path / "ks.json", policy={"mode": "full", "max_queries": 3000}
    )
    rec = bench_bundle(b.path, (1, 8, 64), 0.5, keystore=b.keystore)
    rows = rec["results"]
    assert [r["batch"] for r in rows] == [1, 8, 64]
    assert all(r["capped_by_query_budget"] for r in rows)
    # Per batch size: warm-up + timed calls, end to end and enclave-only phases.
    spent = sum(2 * (r["calls"] + 1) * r["batch"] for r in rows) + 1  # + the first answer
    assert spent <= 3000 // 2 + 64 * 4, spent
