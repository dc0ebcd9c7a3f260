"""Leakage audit: output policies on split_model bundles, metrics on known answers, and an
end-to-end smoke audit."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import ennclave  # noqa: E402
from ennclave.audit import metrics  # noqa: E402
from ennclave.audit.membership import attack_probs  # noqa: E402
from ennclave.audit.oracle import Answers, OwnerView, query_api, soft_targets  # noqa: E402
from ennclave.errors import AuthenticationError, QueryBudgetExhausted  # noqa: E402
from ennclave.split import split_model  # noqa: E402
from support.enclave_bundle import needs_worker  # noqa: E402

IN, CLASSES = 8, 5


def tiny_model() -> keras.Model:
    """Frozen public dense layer + a private head of 5 classes (softmax)."""
    keras.utils.set_random_seed(3)
    L = keras.layers
    inp = keras.Input((IN,), name="x")
    pub = L.Dense(12, activation="relu", name="public_fc")
    h = pub(inp)
    h = L.Dense(10, activation="tanh", name="private_fc1")(h)
    out = L.Dense(CLASSES, activation="softmax", name="private_fc2")(h)
    pub.trainable = False
    return keras.Model(inp, out, name="tiny")


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = tiny_model()
    m.save(d / "tiny.keras")
    return d, m


def _bundle(tiny, name: str, policy: dict) -> tuple:
    d, m = tiny
    ks = d / "keystore.json"
    out = d / name
    split_model(
        d / "tiny.keras", "public_fc", out, keystore=ks, output_policy=policy, overwrite=True
    )
    return out, ks, m


# -- output policies on bundles made by split_model ------------------------------------


@needs_worker
def test_label_policy_returns_only_labels(tiny):
    b, ks, m = _bundle(tiny, "label", {"mode": "label"})
    x = _x(40)
    with ennclave.load(b, keystore=ks) as em:
        y = em.predict(x)
        raw = em.predict_private(em.public_features(x))
    assert y.dtype == np.int64 and y.shape == (40,)
    np.testing.assert_array_equal(y, m.predict(x, verbose=0).argmax(axis=1))
    # Enforced inside the worker: it sends one value per sample, never the scores.
    assert raw.shape == (40, 1)
    np.testing.assert_array_equal(raw[:, 0], y.astype(np.float32))


@needs_worker
def test_top_k_policy_returns_exactly_k(tiny):
    k = 2
    b, ks, m = _bundle(tiny, "topk", {"mode": "top_k", "k": k})
    x = _x(40, seed=1)
    ref = m.predict(x, verbose=0)
    with ennclave.load(b, keystore=ks) as em:
        y = em.predict(x)
        raw = em.predict_private(em.public_features(x))
    assert y.indices.shape == (40, k) and y.values.shape == (40, k)
    assert raw.shape == (40, 2 * k)  # k indices + k values from the worker, nothing more
    assert all(len(set(row)) == k for row in y.indices.tolist())
    assert np.all(np.diff(y.values, axis=1) <= 0)  # best first
    np.testing.assert_array_equal(y.indices, np.argsort(-ref, axis=1, kind="stable")[:, :k])
    np.testing.assert_allclose(y.values, np.take_along_axis(ref, y.indices, 1), atol=1e-5)


@needs_worker
def test_query_budget_stops_at_exactly_n(tiny):
    b, ks, _ = _bundle(tiny, "budget", {"mode": "full", "max_queries": 7})
    x = _x(10, seed=2)
    with ennclave.load(b, keystore=ks) as em:
        em.predict(x[:5])
        with pytest.raises(QueryBudgetExhausted, match="budget of 7"):
            em.predict(x[:3])  # would make 8: refused whole, nothing computed
        em.predict(x[:2])  # exactly 7
        with pytest.raises(QueryBudgetExhausted):
            em.predict(x[:1])
        assert em.ping()["queries_used"] == 7
    # The audit's attacker collects every answer the budget allows, then stops.
    with ennclave.load(b, keystore=ks) as em:
        ans = query_api(em, x, batch_size=4)
    assert (
        ans.n == 7 and ans.asked == 10 and ans.probs is not None and ans.probs.shape == (7, CLASSES)
    )
    assert ans.refusal and "budget" in ans.refusal


@needs_worker
def test_editing_the_policy_in_the_manifest_fails_authentication(tiny):
    b, ks, _ = _bundle(tiny, "edited", {"mode": "label", "max_queries": 100})
    mpath = b / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["output_policy"] = {"mode": "full"}  # lift both the label policy and the budget
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(AuthenticationError, match="did not authenticate"):
        ennclave.load(b, keystore=ks)
    with pytest.raises(AuthenticationError):
        OwnerView(b, ks)


@needs_worker
def test_owner_view_is_the_victim(tiny):
    b, ks, m = _bundle(tiny, "owner", {"mode": "label"})
    x = _x(16, seed=4)
    with ennclave.load(b, keystore=ks) as em:
        f = em.public_features(x)
    np.testing.assert_allclose(OwnerView(b, ks).probs(f), m.predict(x, verbose=0), atol=1e-5)


# -- metrics on known answers ---------------------------------------------------------


def test_auc_known_answers():
    assert metrics.roc_auc(np.array([0.9, 0.8, 0.95]), np.array([0.1, 0.2, 0.3])) == 1.0
    assert metrics.roc_auc(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 0.0
    assert metrics.roc_auc(np.ones(5), np.ones(7)) == 0.5  # ties count one half
    rng = np.random.default_rng(0)
    same = metrics.roc_auc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same - 0.5) < 0.02
    # hand example: pairs (m > n) = 3 of 4, one tie → (3 + 0.5) / 4... here no ties:
    assert metrics.roc_auc(np.array([2.0, 4.0]), np.array([1.0, 3.0])) == 0.75


def test_best_threshold_accuracy():
    acc, t = metrics.best_threshold_accuracy(np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert acc == 1.0 and 3.0 < t <= 5.0
    acc, _ = metrics.best_threshold_accuracy(np.ones(10), np.ones(10))
    assert acc == 0.5


def test_fidelity_and_accuracy():
    v = np.array([0, 1, 2, 3, 1])
    assert metrics.fidelity(v, v) == 1.0
    assert metrics.accuracy(v, np.array([0, 1, 2, 0, 0])) == 0.6


def test_normalisation_on_hand_values():
    n = metrics.normalise(0.6, whitebox=0.9, blackbox=0.5)
    assert n.rel_blackbox == pytest.approx(1.2)  # TEESlice: value / black-box
    assert n.leak_fraction == pytest.approx(0.25)  # ours: (0.6 − 0.5) / (0.9 − 0.5)
    assert not n.blackbox_level  # 0.6 ≥ 1.05 × 0.5
    assert metrics.normalise(0.52, 0.9, 0.5).blackbox_level  # 0.52 < 0.525
    assert metrics.normalise(0.5, 0.5, 0.5).leak_fraction is None
    # sweet spot: smallest enclave below 1.05 × black-box (0.42)
    assert metrics.sweet_spot([100, 10, 1000, 50], [0.5, 0.9, 0.40, 0.41], 0.4) == 3


def test_membership_attacks_on_constructed_outputs():
    y = np.zeros(50, np.int64)
    pm = np.tile([0.95, 0.05], (50, 1))  # members: confident and right
    pn = np.tile([0.55, 0.45], (50, 1))  # non-members: unsure
    r = attack_probs("x", pm, y, pn, y)
    assert r.confidence.auc == 1.0 and r.loss.auc == 1.0 and r.confidence.best_accuracy == 1.0
    assert r.generalisation_gap == 0.0 and r.label_only.best_accuracy == 0.5
    same = attack_probs("x", pn, y, pn, y)
    assert same.confidence.auc == 0.5
    # label-only gap attack: balanced accuracy = 1/2 + gap/2
    pn2 = pn.copy()
    pn2[:20] = [0.4, 0.6]  # 40 % of non-members now wrong → gap 0.4
    r2 = attack_probs("x", pm, y, pn2, y)
    assert r2.generalisation_gap == pytest.approx(0.4)
    assert r2.label_only.best_accuracy == pytest.approx(0.5 + 0.4 / 2)


def test_top_k_soft_targets_spread_the_rest():
    ans = Answers(
        mode="top_k",
        n=1,
        asked=1,
        labels=np.array([2]),
        topk_values=np.array([[0.6, 0.2]], np.float32),
        topk_indices=np.array([[2, 0]]),
    )
    t = soft_targets(ans, 5, 1)
    np.testing.assert_allclose(t, [[0.2, 0.2 / 3, 0.6, 0.2 / 3, 0.2 / 3]], atol=1e-6)
    assert soft_targets(Answers("label", 1, 1, np.array([1])), 5, 1) is None


# -- end to end ------------------------------------------------------------------------


@needs_worker
def test_audit_smoke_end_to_end(tiny, tmp_path):
    from ennclave.cli import main

    _, m = tiny
    b, ks, _ = _bundle(tiny, "smoke", {"mode": "top_k", "k": 2})
    rng = np.random.default_rng(5)
    for name, n in (("q", 60), ("t", 40), ("mem", 30), ("non", 30)):
        x = rng.standard_normal((n, IN)).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", x=x, y=m.predict(x, verbose=0).argmax(axis=1))
    t0 = time.perf_counter()
    rc = main(
        [
            "audit",
            str(b),
            "--keystore",
            str(ks),
            "--queries",
            str(tmp_path / "q.npz"),
            "--test",
            str(tmp_path / "t.npz"),
            "--members",
            str(tmp_path / "mem.npz"),
            "--nonmembers",
            str(tmp_path / "non.npz"),
            "--budgets",
            "10,40",
            "--smoke",
            "--json",
            str(tmp_path / "a.json"),
            "--plot",
            str(tmp_path / "a.png"),
        ]
    )
    assert rc == 0 and time.perf_counter() - t0 < 90
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["kind"] == "bundle" and doc["policy"] == {"mode": "top_k", "k": 2}
    assert doc["provenance"]["command"].startswith("ennclave")
    assert {(e["budget"], e["targets"]) for e in doc["stealing"]} == {
        (10, "top_k"),
        (10, "label"),
        (40, "top_k"),
        (40, "label"),
    }
    for e in doc["stealing"]:
        assert 0 <= e["public_part"]["fidelity"] <= 1 and e["blackbox"] is not None
    assert doc["victim_test_accuracy"] == 1.0  # test labels are the victim's own labels
    targets = {r["target"]: r for r in doc["membership"]}
    assert targets["api"]["outputs"] == "top_k" and targets["api"]["confidence"] is not None
    assert targets["victim (white-box)"]["confidence"] is not None
    assert (tmp_path / "a.png").stat().st_size > 0
