"""`EnclavedModel`: a bundle opened for inference.

The public part runs in its framework (Keras or ONNX Runtime, on a GPU when one is
available); the private part runs only inside the enclave worker (`WorkerClient`),
which receives the sealed program and a data key wrapped to its ephemeral key.

    with ennclave.load("bundle/") as model:
        y = model.predict(x)

Output by the bundle's (authenticated) output policy:

* `full` / `round` — float32 array `(N, *private_output_shape)`;
* `label` — int64 array `(N,)` of arg-max indices;
* `top_k` — `TopK(values (N, k) float32, indices (N, k) int64)`, best first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..bundle import manifest_digest, output_policy, read_manifest, sealed_path
from ..errors import BundleError, EnnclaveError, InputError
from .public import PublicPart
from .worker import DEFAULT_CALL_TIMEOUT_S, WorkerClient, local_key_release


class TopK(NamedTuple):
    values: np.ndarray
    indices: np.ndarray


# More values in one sample than this (2^31 floats, 8 GiB) is no real model: a
# manifest that declares it is damaged (and would overflow buffer sizes).
MAX_SAMPLE_VALUES = 1 << 31


def _per_sample(shape: list[Any]) -> int:
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


class EnclavedModel:
    """A bundle opened for inference; see the module docstring."""

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        keystore: Any = None,
        *,
        worker_binary: str | os.PathLike[str] | None = None,
        threads: int = 0,
        max_batch: int = 256,
        providers: list[str] | None = None,
        keyserver: str | None = None,
        timeout: float | None = DEFAULT_CALL_TIMEOUT_S,
        platform: str = "native",
        evidence: str = "software",
        gramine_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest, raw = read_manifest(self.bundle)
        private = self.manifest["private"]
        self._in_shape = tuple(self._spec("private", "inputs")["shape"])
        self._out_shape = tuple(self._spec("private", "outputs")["shape"])
        pub = self.manifest.get("public")
        self.input_spec = self._spec("public", "inputs") if pub else self._spec("private", "inputs")
        self.output_policy: dict[str, Any] = output_policy(self.manifest)

        source = private.get("key_source", "local")
        if keyserver is None and source == "keyserver":
            keyserver = (private.get("keyserver") or {}).get("url")
            if not isinstance(keyserver, str) or not keyserver:
                raise BundleError("manifest.json names no key server URL; the bundle is damaged.")
        self._relay: Any = None
        if keyserver:
            # Key-server mode: the host only relays HELLO/EVIDENCE and the wrapped key.
            from ..keyserver.client import KeyserverRelease

            self._relay = KeyserverRelease(
                keyserver, private["key_id"], manifest_digest(self.manifest)
            )
            release: Any = self._relay
        elif source != "local":
            raise EnnclaveError(
                f"This bundle's key comes from a {source!r} key source, which this ennclave "
                "cannot use; ask the owner for a local-key or key-server bundle."
            )
        else:
            from ..keystore import Keystore

            ks = keystore if hasattr(keystore, "get") else Keystore(keystore)
            ks.get(private["key_id"])  # fail early and clearly (KeyNotFound) before spawning
            release = local_key_release(ks, private["key_id"])

        self._public = (
            PublicPart(self.bundle / pub["file"], pub["framework"], providers) if pub else None
        )
        self._worker = WorkerClient(
            raw,
            sealed_path(self.bundle, self.manifest),
            release,
            binary=worker_binary,
            threads=threads,
            max_batch=max_batch,
            in_len=_per_sample(list(self._in_shape)),
            out_len=_per_sample(list(self._out_shape)),
            start=self._relay is None,
            call_timeout=timeout,
            platform=platform,
            evidence=evidence,
            gramine_dir=gramine_dir,
        )
        if self._relay is not None:
            self._relay.bind(self._worker)
            self._worker.start()
            self._worker.restarts = 0  # the first start is not a restart

    def _spec(self, part: str, which: str) -> dict[str, Any]:
        try:
            specs = self.manifest[part][which]
            spec = specs[0]
            shape = spec["shape"]
            if shape[0] is not None or any(
                not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape[1:]
            ):
                raise ValueError
            if _per_sample(shape) > MAX_SAMPLE_VALUES:
                raise ValueError
            return spec
        except (KeyError, IndexError, TypeError, ValueError):
            raise BundleError(
                f"manifest.json has no valid {part}.{which}; the bundle is damaged."
            ) from None

    # -- properties -----------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return tuple(self.input_spec["shape"])

    @property
    def output_shape(self) -> tuple[int | None, ...]:
        return self._out_shape

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid

    @property
    def worker(self) -> WorkerClient:
        return self._worker

    @property
    def licence(self) -> Any:
        """Key-server mode: the licence of the current key release (`Licence`), else None."""
        lic = self._relay.licence if self._relay is not None else None
        return lic.licence if lic is not None else None

    # -- inference -------------------------------------------------------------------

    def _validate(self, x: Any, allow_nonfinite: bool) -> np.ndarray:
        want = self.input_shape
        try:
            arr = np.asarray(x)
        except Exception:
            raise InputError(
                "The input cannot be converted to a numeric array; pass a numpy array."
            ) from None
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise InputError(
                f"The input has dtype {arr.dtype}; pass real numbers (float32 preferred)."
            )
        if arr.ndim == len(want) - 1 and tuple(arr.shape) == tuple(want[1:]):
            raise InputError(
                f"The input has shape {arr.shape}, a single sample without the batch dimension; "
                "pass x[None] for one sample."
            )
        if arr.ndim != len(want):
            raise InputError(
                f"The input has rank {arr.ndim} (shape {arr.shape}) but the model expects rank "
                f"{len(want)} {list(want)}; reshape it."
            )
        if arr.shape[0] == 0:
            raise InputError("The input batch is empty; pass at least one sample.")
        for got, exp in zip(arr.shape[1:], want[1:], strict=True):
            if exp is not None and got != exp:
                raise InputError(
                    f"The input has shape {arr.shape} but the model expects {list(want)} "
                    "(batch first); reshape it."
                )
        dtype = np.dtype(self.input_spec.get("dtype") or "float32")
        if dtype.kind in "iu":  # token ids, byte values: the public part takes integers
            if not np.issubdtype(arr.dtype, np.integer):
                raise InputError(
                    f"The input has dtype {arr.dtype} but the model takes integer ids "
                    f"({dtype}); pass an integer array."
                )
            return np.ascontiguousarray(arr.astype(dtype, copy=False))
        arr = arr.astype(np.float32, copy=False)
        if not allow_nonfinite and not np.isfinite(arr).all():
            raise InputError(
                "The input contains NaN or infinity; clean it, or pass allow_nonfinite=True "
                "(`ennclave run --allow-nonfinite`)."
            )
        return np.ascontiguousarray(arr)

    def predict(
        self,
        x: Any,
        batch_size: int = 32,
        *,
        allow_nonfinite: bool = False,
        pipeline: bool | None = None,
    ) -> np.ndarray | TopK:
        """Run the whole model on `x` (batch first). See the module docstring for the
        output type under each output policy.

        With a public part and more than one batch, `pipeline=True` runs the public
        part of batch i+1 while the enclave works on batch i (one background thread, at
        most two batches in flight); results keep their order and the first error is
        raised. `pipeline=False` runs the batches one after the other. The default
        (None) pipelines only when the public part runs on a GPU: there it was 1.2-1.8x
        the sequential order (benchmarks/gpu_public_part.py), while on CPU both stages
        compete for the same cores, and on this project's 2-core machine the
        sequential order was faster (benchmarks/bench_pipeline.py)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        arr = self._validate(x, allow_nonfinite)
        starts = range(0, arr.shape[0], batch_size)
        if pipeline is None:
            pipeline = self._public is not None and self._public.on_gpu
        if pipeline and self._public is not None and len(starts) > 1:
            outs = self._predict_pipelined(arr, starts, batch_size, allow_nonfinite)
        else:
            outs = []
            for s in starts:
                xb = arr[s : s + batch_size]
                h = self._public(xb) if self._public is not None else xb
                outs.append(self._infer(h, allow_nonfinite))
        return self._shape_output(np.concatenate(outs, axis=0))

    def _predict_pipelined(
        self, arr: np.ndarray, starts: range, batch_size: int, allow_nonfinite: bool
    ) -> list[np.ndarray]:
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        public = self._public
        assert public is not None
        outs: list[np.ndarray] = []
        pending: deque[Future[np.ndarray]] = deque()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ennclave-enclave")
        try:
            for s in starts:
                h = public(arr[s : s + batch_size])  # overlaps the enclave's previous batch
                # poll=False: this thread must not keep taking the GIL from the public part.
                pending.append(pool.submit(self._infer, h, allow_nonfinite, False))
                while len(pending) > 1:  # bounded: wait for the batch before this one
                    outs.append(pending.popleft().result())
            while pending:
                outs.append(pending.popleft().result())
        finally:
            # On an error: drop queued batches, wait for the one in the worker.
            pool.shutdown(wait=True, cancel_futures=True)
        return outs

    def public_features(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """Run only the public part on `x`: the cut tensor (float32, batch first). Needs
        no enclave and uses no query budget; any holder of the bundle can do this, which
        is why `ennclave audit` gives it to the attacker."""
        arr = self._validate(x, allow_nonfinite=False)
        if self._public is None:
            return arr
        step = max(1, int(batch_size))
        return np.concatenate(
            [self._public(arr[s : s + step]) for s in range(0, arr.shape[0], step)], axis=0
        )

    def predict_private(self, h: Any, *, allow_nonfinite: bool = False) -> np.ndarray:
        """Run only the private part on the cut tensor `h` (raw policy output, float32
        `(N, values per sample)`)."""
        h = np.ascontiguousarray(np.asarray(h, dtype=np.float32))
        if h.ndim == 0 or h.shape[0] == 0:
            raise InputError("The input batch is empty; pass at least one sample.")
        if not allow_nonfinite and not np.isfinite(h).all():
            raise InputError(
                "The input contains NaN or infinity; clean it, or pass allow_nonfinite=True "
                "(`ennclave run --allow-nonfinite`)."
            )
        return self._infer(h, allow_nonfinite)

    def _infer(self, h: np.ndarray, allow_nonfinite: bool, poll: bool = True) -> np.ndarray:
        relay = self._relay
        if relay is None:
            return self._worker.infer(h, allow_nonfinite=allow_nonfinite, poll=poll)
        n = int(h.shape[0]) if h.ndim else 1
        outs: list[np.ndarray] = []
        s = 0
        while s < n:
            # A metered key's licence holds one slice of its budget: when the slice runs
            # out and the key server has more, the worker is replaced in order (its usage
            # report credits back what it did not use) and the fresh one gets the next
            # slice. Without more, the whole batch is refused before any of it is run.
            held = relay.licence
            left = held.left if held is not None else None
            take = n - s
            if left is not None and left < take and relay.renewable:
                if left == 0:
                    self._renew()
                    continue
                take = left
            relay.spend(take)
            outs.append(
                self._worker.infer(h[s : s + take], allow_nonfinite=allow_nonfinite, poll=poll)
            )
            s += take
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def _renew(self) -> None:
        """The next slice of a metered budget: a fresh worker and key release. A key
        server that has nothing left after all refuses with the reason."""
        from ..errors import QueryBudgetExhausted
        from ..keyserver.client import KeyReleaseRefused

        try:
            self._worker.restart()
        except KeyReleaseRefused as e:
            if e.code != "budget_spent":
                raise
            raise QueryBudgetExhausted(str(e), 4, False) from None

    def _shape_output(self, raw: np.ndarray) -> np.ndarray | TopK:
        mode = self.output_policy.get("mode", "full")
        n = raw.shape[0]
        if mode == "label":
            return raw[:, 0].astype(np.int64)
        if mode == "top_k":
            k = raw.shape[1] // 2
            return TopK(values=raw[:, k:].copy(), indices=raw[:, :k].astype(np.int64))
        return raw.reshape((n, *self._out_shape[1:]))

    def ping(self) -> dict[str, int]:
        """Health check of the enclave worker."""
        return self._worker.ping()

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> EnclavedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EnclavedModel({str(self.bundle)!r}, policy={self.output_policy}, worker_pid={self.worker_pid})"


def load(bundle: str | os.PathLike[str], keystore: Any = None, **kwargs: Any) -> EnclavedModel:
    """Open a bundle: verify its integrity digests, load the public part, start the
    enclave worker and hand it the sealed program and the wrapped data key."""
    return EnclavedModel(bundle, keystore, **kwargs)
