"""Scan this process's own memory for a 32-byte needle given as two 16-byte halves.

Used by the "host never holds the secret" tests, which run it in a fresh interpreter:
the needle is never held as one contiguous run, so only a real copy of the secret
(weights or data key) can produce a hit.
"""

from __future__ import annotations

SKIP = ("[vvar]", "[vsyscall]", "[vvar_vclock]")


def scan_self(a: bytes, b: bytes) -> int:
    """Number of places where `a` is immediately followed by `b` in readable memory."""
    hits = 0
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for r in regions:
            if "r" not in r[1] or (len(r) > 5 and r[5] in SKIP):
                continue
            lo, hi = (int(v, 16) for v in r[0].split("-"))
            for start in range(lo, hi, 1 << 24):
                try:
                    mem.seek(start)
                    chunk = mem.read(min(hi, start + (1 << 24) + 31) - start)
                except OSError:
                    continue
                i = chunk.find(a)
                while i >= 0:
                    if chunk[i + 16 : i + 32] == b:
                        hits += 1
                    i = chunk.find(a, i + 1)
                del chunk
    return hits
