"""Key-server benchmark on loopback: two replicas on one PostgreSQL, attested key
releases per second, then the same with one replica SIGKILLed halfway.

    python benchmarks/bench_keyserver.py [--seconds 60] [--clients 8] [--max-clients 48]

Starts a real PostgreSQL (tests/support/postgres.py: initdb + pg_ctl in a temporary
directory, 127.0.0.1, PostgreSQL's default durability — fsync on) and two key-server
processes (`ennclave keyserver --db postgresql://…`, 127.0.0.1, rate limit off) on it,
registers a key that allows software evidence with `max_clients`, and runs `--clients`
client threads, half on each replica, each looping the full release flow — POST
/v1/challenge, software evidence for the nonce, POST /v1/release — over keep-alive
connections for `--seconds` (it always stops by itself). The threads share a pool of
`max_clients + 2` client ids, so a few requests are refused `too_many_clients` (an
expected answer, not an error). Every 50th release is HPKE-unwrapped and compared
with the data key.

Run 1 (sustained): both replicas throughout; the target is ≥ 300 releases/s with 0
errors. Run 2 (failover): replica A is SIGKILLed at `--seconds / 2`; its clients move
to replica B (requests in flight at the kill are counted as `interrupted`: never
acknowledged). Afterwards, from the database: every acknowledged release (its licence
id) has its audit row, the audit chain verifies, and exactly `max_clients` clients
were admitted. Writes benchmarks/results/keyserver.json.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE.parent / "tests"))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite  # noqa: E402
from sqlalchemy import text  # noqa: E402

from ennclave.keyserver.client import KeyServerClient  # noqa: E402
from ennclave.keyserver.evidence import evidence_hash  # noqa: E402
from ennclave.keyserver.store import Store  # noqa: E402
from ennclave.seal import hpke_info  # noqa: E402
from support.keyserver_util import KeyServerProc  # noqa: E402
from support.postgres import PostgresServer  # noqa: E402

KEY_ID = "bench-key"
MANIFEST = "ab" * 32
HDR = {"content-type": "application/json"}


@dataclass
class Stats:
    t0: float
    ok: int = 0
    refused: int = 0  # too_many_clients: an expected answer
    errors: int = 0
    interrupted: int = 0  # connection lost mid-request (the killed replica)
    failovers: int = 0
    last_error: str | None = None
    lat: list[float] = field(default_factory=list)
    per_second: dict[int, int] = field(default_factory=dict)
    licences: list[str] = field(default_factory=list)  # acknowledged releases
    lock: threading.Lock = field(default_factory=threading.Lock)


class Lost(Exception):
    """The connection broke after the request was sent: never acknowledged."""


def client_loop(
    ports: list[int], ids: list[str], data_key: bytes, stop_at: float, st: Stats, seed: int
) -> None:
    sk = X25519PrivateKey.generate()
    pub = sk.public_key().public_bytes_raw()
    binsha = hashlib.sha256(b"bench worker").digest()
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    at = 0  # index into ports: the replica this client talks to
    conn = http.client.HTTPConnection("127.0.0.1", ports[at], timeout=10)
    ch_body = json.dumps({"key_id": KEY_ID})
    n = seed

    def call(path: str, body: str) -> tuple[int, bytes]:
        try:
            conn.request("POST", path, body, HDR)
        except OSError as e:  # not sent: the replica is gone
            raise ConnectionRefusedError(str(e)) from None
        try:
            r = conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            raise Lost(str(e)) from None

    while time.monotonic() < stop_at:
        n += 1
        t0 = time.perf_counter()
        try:
            status, body = call("/v1/challenge", ch_body)
            if status != 200:
                raise RuntimeError(f"challenge {status} {body[:200]!r}")
            nonce = bytes.fromhex(json.loads(body)["nonce"])
            req = {
                "key_id": KEY_ID,
                "nonce": nonce.hex(),
                "pubkey": pub.hex(),
                "binary_sha256": binsha.hex(),
                "manifest_sha256": MANIFEST,
                "client_id": ids[n % len(ids)],
                "evidence": {
                    "kind": "software",
                    "report": base64.b64encode(evidence_hash(nonce, pub, binsha)).decode(),
                },
            }
            status, body = call("/v1/release", json.dumps(req))
            resp = json.loads(body)
            if status == 403 and resp.get("error") == "too_many_clients":
                with st.lock:
                    st.refused += 1
                continue
            if status != 200:
                raise RuntimeError(f"release {status} {body[:200]!r}")
            if n % 50 == 0:
                ct = base64.b64decode(resp["enc"]) + base64.b64decode(resp["wrapped"])
                if suite.decrypt(ct, sk, info=hpke_info(KEY_ID)) != data_key:
                    raise RuntimeError("unwrapped key differs")
            licence = json.loads(base64.b64decode(resp["licence"]))
            dt = time.perf_counter() - t0
            with st.lock:
                st.ok += 1
                st.lat.append(dt)
                st.licences.append(licence["licence_id"])
                sec = int(time.monotonic() - st.t0)
                st.per_second[sec] = st.per_second.get(sec, 0) + 1
        except (ConnectionRefusedError, Lost) as e:
            conn.close()
            with st.lock:
                if isinstance(e, Lost):
                    st.interrupted += 1
                st.failovers += 1
            at = (at + 1) % len(ports)  # the next replica
            conn = http.client.HTTPConnection("127.0.0.1", ports[at], timeout=10)
            time.sleep(0.05)
        except Exception as e:  # counted, reported
            with st.lock:
                st.errors += 1
                st.last_error = str(e)[:300]
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", ports[at], timeout=10)
    conn.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_pids(pg: PostgresServer) -> list[int]:
    """The postmaster and its children (backends, writer, WAL writer, …)."""
    try:
        master = int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError):
        return []
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return [master, *kids]


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine used so far (all cores; /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(replicas: list[KeyServerProc], pg: PostgresServer) -> dict[str, float]:
    t = os.times()
    return {
        "replicas": sum(_cpu_s(r.proc.pid) for r in replicas if r.proc),
        "postgresql": sum(_cpu_s(p) for p in _postgres_pids(pg)),
        "clients": t.user + t.system,
        "machine": _machine_busy_s(),
    }


def run(
    replicas: list[KeyServerProc],
    seconds: float,
    clients: int,
    ids: list[str],
    data_key: bytes,
    kill_at: float | None = None,
) -> tuple[Stats, float]:
    st = Stats(t0=time.monotonic())
    stop_at = st.t0 + seconds
    ports = [r.port for r in replicas]
    threads = [
        threading.Thread(
            target=client_loop,
            args=(ports[i % 2 :] + ports[: i % 2], ids, data_key, stop_at, st, i * 7919),
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    if kill_at is not None:
        time.sleep(max(0.0, st.t0 + kill_at - time.monotonic()))
        victim = replicas[0].proc
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    for t in threads:
        t.join()
    return st, time.monotonic() - st.t0


def summary(st: Stats, elapsed: float) -> dict[str, Any]:
    lat = sorted(st.lat)
    full = [st.per_second.get(s, 0) for s in range(int(elapsed))]  # complete seconds only
    return {
        "releases": st.ok,
        "releases_per_s": round(st.ok / elapsed, 1),
        "min_releases_in_a_1s_window": min(full) if full else None,
        "refused_too_many_clients": st.refused,
        "errors": st.errors,
        "last_error": st.last_error,
        "interrupted_unacknowledged": st.interrupted,
        "failovers": st.failovers,
        "seconds": round(elapsed, 2),
        "latency_ms": {
            q: round(lat[int(len(lat) * f) - 1] * 1e3, 2) if lat else None
            for q, f in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
    }


def check_database(url: str, licences: list[str], max_clients: int) -> dict[str, Any]:
    """From the database itself: every acknowledged release audited, chain intact,
    exactly `max_clients` admitted."""
    st = Store(url, b"\0" * 32, migrate=False)
    try:
        rows = st.verify_audit_chain()
        with st.read() as c:  # every grant (audit_log shows at most 10 000 rows)
            granted = {
                lic
                for (lic,) in c.execute(
                    text("SELECT licence_id FROM audit WHERE decision = 'granted' AND key_id = :k"),
                    {"k": KEY_ID},
                )
            }
        clients = st.get(KEY_ID).clients  # type: ignore[union-attr]
    finally:
        st.close()
    lost = [lic for lic in licences if lic not in granted]
    return {
        "audit_rows": rows,
        "audit_chain": "intact",
        "acknowledged_releases": len(licences),
        "acknowledged_without_audit_row": len(lost),
        "clients_admitted": clients,
        "max_clients": max_clients,
    }


def start_replicas(url: str, cfg: Path) -> list[KeyServerProc]:
    a = KeyServerProc(url, cfg, extra=["--rate", "0"]).start()
    b = KeyServerProc(url, cfg, extra=["--rate", "0"]).start()
    return [a, b]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-clients", type=int, default=48)
    ap.add_argument("--target", type=float, default=300.0, help="releases/s (run 1)")
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "keyserver.json"))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ennclave-bench-ks-"))
    cfg = tmp / "cfg"
    os.environ["ENNCLAVE_CONFIG_DIR"] = str(cfg)
    pg = PostgresServer.find(durable=True)
    if pg is None:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 2
    pg.start()
    ids = [f"{i:032x}" for i in range(a.max_clients + 2)]
    results: dict[str, Any] = {}
    try:
        for name, kill in (("sustained", None), ("replica_killed_halfway", a.seconds / 2)):
            if kill is not None and a.skip_failover:
                continue
            url = pg.create_database("bench")
            (cfg / name).mkdir(parents=True, exist_ok=True)
            replicas = start_replicas(url, cfg / name)
            os.environ["ENNCLAVE_CONFIG_DIR"] = str(cfg / name)
            try:
                data_key = os.urandom(32)
                with KeyServerClient(replicas[0].url, replicas[0].token) as c:
                    c.register(
                        KEY_ID,
                        data_key,
                        MANIFEST,
                        {"allow_software": True, "max_clients": a.max_clients},
                    )
                before = cpu_snapshot(replicas, pg)
                st, elapsed = run(replicas, a.seconds, a.clients, ids, data_key, kill)
                after = cpu_snapshot(replicas, pg)
            finally:
                for r in replicas:
                    r.stop()
            res = summary(st, elapsed)
            used = {k: after[k] - before[k] for k in after}
            ours = used["replicas"] + used["postgresql"] + used["clients"]
            if kill is None:  # (a killed replica's CPU time is gone with it)
                res["cpu_ms_per_release"] = {
                    k: round(1e3 * used[k] / max(1, st.ok), 3)
                    for k in ("replicas", "postgresql", "clients")
                }
                res["releases_per_cpu_second"] = round(st.ok / max(ours, 1e-9), 1)
                # Other sessions share this machine: what they used meanwhile, in cores
                res["other_processes_cpu_cores"] = round(
                    max(0.0, used["machine"] - ours) / elapsed, 2
                )
            res["database"] = check_database(url, st.licences, a.max_clients)
            if kill is not None:
                res["sigkill_at_s"] = kill
            results[name] = res
            print(name, json.dumps(res, indent=2), flush=True)
    finally:
        pg.stop()

    import importlib.metadata as md

    run1 = results["sustained"]
    checks = {
        "sustained_releases_per_s_at_least_target": run1["releases_per_s"] >= a.target,
        "sustained_zero_errors": run1["errors"] == 0,
    }
    for name, res in results.items():
        db = res["database"]
        checks[f"{name}_no_acknowledged_release_lost"] = db["acknowledged_without_audit_row"] == 0
        checks[f"{name}_max_clients_exact"] = db["clients_admitted"] == a.max_clients
        checks[f"{name}_errors"] = res["errors"] == 0
    out = {
        **results,
        "checks": checks,
        "settings": {
            "seconds": a.seconds,
            "clients": a.clients,
            "replicas": 2,
            "max_clients": a.max_clients,
            "client_ids": len(ids),
            "rate_limit": "off",
            "database": "PostgreSQL (fsync on, synchronous_commit on), loopback TCP",
            "http_requests_per_release": 2,
        },
        "versions": {
            p: md.version(p) for p in ("fastapi", "uvicorn", "sqlalchemy", "psycopg", "httptools")
        },
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "command": "python benchmarks/bench_keyserver.py " + " ".join(sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    ok = all(checks.values())
    print(f"{'PASS' if ok else 'FAIL'}: " + ", ".join(k for k, v in checks.items() if not v))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
