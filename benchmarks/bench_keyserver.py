"""Key-server load benchmark on loopback: attested key releases per second.

    python benchmarks/bench_keyserver.py [--seconds 30] [--max-releases 15000] [--clients 8]

Starts a real key server (subprocess, SQLite in a temporary directory, 127.0.0.1, free
port, rate limit lifted for the one benchmark client address), registers a bundle key
that allows software evidence, then `--clients` threads each run the full release
flow — POST /v1/challenge, compute software evidence for the nonce, POST /v1/release —
over keep-alive connections until `--seconds` pass or `--max-releases` are done
(whichever first; it always stops by itself). Every 50th release is HPKE-unwrapped and
compared with the data key. Prints the numbers and writes
benchmarks/results/keyserver.json. Each release also writes one audit row (SQLite WAL).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE.parent / "tests"))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite  # noqa: E402

from ennclave.keyserver.client import KeyServerClient  # noqa: E402
from ennclave.keyserver.evidence import evidence_hash  # noqa: E402
from ennclave.seal import hpke_info  # noqa: E402
from support.keyserver_util import KeyServerProc  # noqa: E402


def worker_loop(port, key_id, digest, data_key, stop_at, budget, stats, lock, window):
    sk = X25519PrivateKey.generate()
    pub = sk.public_key().public_bytes_raw()
    binsha = hashlib.sha256(b"bench worker").digest()
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    hdr = {"content-type": "application/json"}
    ch_body = json.dumps({"key_id": key_id})
    n = 0
    while time.monotonic() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/challenge", ch_body, hdr)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"challenge {r.status} {body[:200]!r}")
            nonce = bytes.fromhex(json.loads(body)["nonce"])
            req = {
                "key_id": key_id,
                "nonce": nonce.hex(),
                "pubkey": pub.hex(),
                "binary_sha256": binsha.hex(),
                "manifest_sha256": digest,
                "client_id": "be" * 32,
                "evidence": {
                    "kind": "software",
                    "report": base64.b64encode(evidence_hash(nonce, pub, binsha)).decode(),
                },
            }
            conn.request("POST", "/v1/release", json.dumps(req), hdr)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"release {r.status} {body[:200]!r}")
            n += 1
            if n % 50 == 1:
                resp = json.loads(body)
                ct = base64.b64decode(resp["enc"]) + base64.b64decode(resp["wrapped"])
                if suite.decrypt(ct, sk, info=hpke_info(key_id)) != data_key:
                    raise RuntimeError("unwrapped key differs")
            dt = time.perf_counter() - t0
            with lock:
                stats["ok"] += 1
                stats["lat"].append(dt)
                sec = int(time.monotonic() - stats["t0"])
                window[sec] = window.get(sec, 0) + 1
        except Exception as e:  # counted, reported
            with lock:
                stats["errors"] += 1
                stats["last_error"] = str(e)[:300]
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-releases", type=int, default=15000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "keyserver.json"))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ennclave-bench-ks-"))
    cfg = tmp / "cfg"
    os.environ["ENNCLAVE_CONFIG_DIR"] = str(cfg)
    srv = KeyServerProc(str(tmp / "keys.db"), cfg, extra=["--rate", "0"]).start()
    try:
        data_key, key_id, digest = os.urandom(32), "bench-key", "ab" * 32
        with KeyServerClient(srv.url, srv.token) as c:
            c.register(key_id, data_key, digest, {"allow_software": True, "query_budget": 1000})
        stats = {"ok": 0, "errors": 0, "lat": [], "t0": time.monotonic(), "last_error": None}
        window: dict[int, int] = {}
        lock = threading.Lock()
        budget = [a.max_releases]
        t0 = time.monotonic()
        stats["t0"] = t0
        threads = [
            threading.Thread(
                target=worker_loop,
                args=(
                    srv.port,
                    key_id,
                    digest,
                    data_key,
                    t0 + a.seconds,
                    budget,
                    stats,
                    lock,
                    window,
                ),
            )
            for _ in range(a.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        with KeyServerClient(srv.url, srv.token) as c:
            audited = sum(1 for r in c.audit(key_id, 10000) if r["decision"] == "granted")
    finally:
        srv.stop()
    lat = sorted(stats["lat"])
    full = [window[s] for s in sorted(window) if s < int(elapsed)]  # complete seconds only
    res = {
        "releases": stats["ok"],
        "errors": stats["errors"],
        "last_error": stats["last_error"],
        "seconds": round(elapsed, 2),
        "releases_per_s": round(stats["ok"] / elapsed, 1),
        "min_releases_in_a_1s_window": min(full) if full else None,
        "latency_ms": {
            q: round(lat[int(len(lat) * f) - 1] * 1e3, 2) if lat else None
            for q, f in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
        "audit_rows_granted": audited,
        "clients": a.clients,
        "http_requests_per_release": 2,
        "settings": {"seconds": a.seconds, "max_releases": a.max_releases, "rate_limit": "off"},
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "command": "python benchmarks/bench_keyserver.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    ok = res["errors"] == 0 and res["releases_per_s"] >= 200
    print(f"{'PASS' if ok else 'FAIL'}: {res['releases_per_s']} releases/s, {res['errors']} errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
