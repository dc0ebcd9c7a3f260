"""`EnclavedModel`: a bundle opened for inference.

The public part runs in its framework (Keras or ONNX Runtime, on a GPU when one is
available); the private part runs only inside the enclave worker (`WorkerClient`),
which receives the sealed program and a data key wrapped to its ephemeral key.

    with ennclave.load("bundle/") as model:
        y = model.predict(x)

A model of several inputs (token ids, segment ids, padding mask) takes them as Keras
does: a list in the model's input order (`model.input_names`) or a dict by name. The
public part gets the inputs it reads, the enclave the cut tensor plus the model inputs
the private part reads itself (the manifest says which; they are the client's own).

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
        self._private_specs = self._specs("private", "inputs")
        self._in_shape = tuple(self._private_specs[0]["shape"])
        self._out_shape = tuple(self._spec("private", "outputs")["shape"])
        pub = self.manifest.get("public")
        if "inputs" in self.manifest:  # a model of several inputs
            self.input_specs = self._specs(None, "inputs")
        else:
            self.input_specs = [
                self._spec("public", "inputs") if pub else self._spec("private", "inputs")
            ]
        self.input_spec = self.input_specs[0]
        self.input_names: list[str] = [str(s.get("name", "")) for s in self.input_specs]
        # Where each public and private input comes from: an index into the model
        # inputs, or (private input 0 behind a public part) None for the cut tensor.
        self._public_from = (
            [self._model_input(s) for s in self._specs("public", "inputs")]
            if pub and len(self.input_specs) > 1
            else [0]
        )
        self._private_from: list[int | None] = (
            [None if pub and i == 0 else self._model_input(s)
             for i, s in enumerate(self._private_specs)]
            if len(self._private_specs) > 1 or len(self.input_specs) > 1
            else [None if pub else 0]
        )  # fmt: skip
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
            PublicPart(
                self.bundle / pub["file"],
                pub["framework"],
                providers,
                [self.input_names[i] for i in self._public_from],
            )
            if pub
            else None
        )
        self._worker = WorkerClient(
            raw,
            sealed_path(self.bundle, self.manifest),
            release,
            binary=worker_binary,
            threads=threads,
            max_batch=max_batch,
            in_len=sum(_per_sample(list(s["shape"])) for s in self._private_specs),
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
        return self._specs(part, which)[0]

    def _specs(self, part: str | None, which: str) -> list[dict[str, Any]]:
        """The tensor specs at manifest[part][which] (or manifest[which]), checked."""
        where = which if part is None else f"{part}.{which}"
        try:
            specs = self.manifest[which] if part is None else self.manifest[part][which]
            if not isinstance(specs, list) or not specs:
                raise ValueError
            for spec in specs:
                shape = spec["shape"]
                if shape[0] is not None or any(
                    not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape[1:]
                ):
                    raise ValueError
                if _per_sample(shape) > MAX_SAMPLE_VALUES:
                    raise ValueError
            return specs
        except (KeyError, IndexError, TypeError, ValueError):
            raise BundleError(
                f"manifest.json has no valid {where}; the bundle is damaged."
            ) from None

    def _model_input(self, spec: dict[str, Any]) -> int:
        """The index of the model input that feeds a public or private input."""
        name = spec.get("name")
        if name not in self.input_names:
            raise BundleError(
                f"manifest.json feeds input {name!r} from no model input; the bundle is damaged."
            )
        return self.input_names.index(name)

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

    def _validate_all(self, x: Any, allow_nonfinite: bool) -> list[np.ndarray]:
        """The model inputs, checked, one array each in model-input order: an array
        (a single-input model), a list or tuple in `input_names` order, or a dict by
        name. Every input must have the same batch."""
        specs = self.input_specs
        if len(specs) == 1:
            if isinstance(x, dict) and len(x) == 1 and self.input_names[0] in x:
                x = x[self.input_names[0]]
            return [self._validate(x, allow_nonfinite)]
        names = self.input_names
        if isinstance(x, dict):
            unknown = sorted(str(k) for k in x if k not in names)
            missing = [n for n in names if n not in x]
            if unknown or missing:
                raise InputError(
                    f"The model takes inputs {names}; the dict "
                    + (f"lacks {missing}" if missing else "")
                    + (" and " if missing and unknown else "")
                    + (f"has unknown {unknown}" if unknown else "")
                    + "."
                )
            xs = [x[n] for n in names]
        elif isinstance(x, (list, tuple)):
            if len(x) != len(names):
                raise InputError(
                    f"The model takes {len(names)} inputs {names}, got {len(x)}; pass a list "
                    "in this order or a dict by name."
                )
            xs = list(x)
        else:
            raise InputError(
                f"The model takes {len(names)} inputs {names}; pass a list in this order or "
                "a dict by name, not one array."
            )
        arrs = [
            self._validate(a, allow_nonfinite, spec, f"Input {n!r}")
            for a, spec, n in zip(xs, specs, names, strict=True)
        ]
        sizes = {a.shape[0] for a in arrs}
        if len(sizes) > 1:
            raise InputError(
                f"The inputs have different batch sizes {[a.shape[0] for a in arrs]}; pass the "
                "same number of samples for every input."
            )
        return arrs

    def _validate(
        self,
        x: Any,
        allow_nonfinite: bool,
        spec: dict[str, Any] | None = None,
        what: str = "The input",
    ) -> np.ndarray:
        spec = self.input_spec if spec is None else spec
        want = tuple(spec["shape"])
        try:
            arr = np.asarray(x)
        except Exception:
            raise InputError(
                f"{what} cannot be converted to a numeric array; pass a numpy array."
            ) from None
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise InputError(
                f"{what} has dtype {arr.dtype}; pass real numbers (float32 preferred)."
            )
        if arr.ndim == len(want) - 1 and tuple(arr.shape) == tuple(want[1:]):
            raise InputError(
                f"{what} has shape {arr.shape}, a single sample without the batch dimension; "
                "pass x[None] for one sample."
            )
        if arr.ndim != len(want):
            raise InputError(
                f"{what} has rank {arr.ndim} (shape {arr.shape}) but the model expects rank "
                f"{len(want)} {list(want)}; reshape it."
            )
        if arr.shape[0] == 0:
            raise InputError(f"{what} batch is empty; pass at least one sample.")
        for got, exp in zip(arr.shape[1:], want[1:], strict=True):
            if exp is not None and got != exp:
                raise InputError(
                    f"{what} has shape {arr.shape} but the model expects {list(want)} "
                    "(batch first); reshape it."
                )
        dtype = np.dtype(spec.get("dtype") or "float32")
        if dtype.kind in "iu":  # token ids, byte values: the public part takes integers
            if not np.issubdtype(arr.dtype, np.integer):
                raise InputError(
                    f"{what} has dtype {arr.dtype} but the model takes integer ids "
                    f"({dtype}); pass an integer array."
                )
            return np.ascontiguousarray(arr.astype(dtype, copy=False))
        arr = arr.astype(np.float32, copy=False)
        if not allow_nonfinite and not np.isfinite(arr).all():
            raise InputError(
                f"{what} contains NaN or infinity; clean it, or pass allow_nonfinite=True "
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
        xs = self._validate_all(x, allow_nonfinite)
        starts = range(0, xs[0].shape[0], batch_size)
        if pipeline is None:
            pipeline = self._public is not None and self._public.on_gpu
        if pipeline and self._public is not None and len(starts) > 1:
            outs = self._predict_pipelined(xs, starts, batch_size, allow_nonfinite)
        else:
            outs = []
            for s in starts:
                xb = [a[s : s + batch_size] for a in xs]
                outs.append(self._infer(self._private_feed(xb), allow_nonfinite))
        return self._shape_output(np.concatenate(outs, axis=0))

    def _public_of(self, xs: list[np.ndarray]) -> np.ndarray:
        """The public part's output (the cut tensor) for the model inputs `xs`."""
        assert self._public is not None
        ins = [xs[i] for i in self._public_from]
        return self._public(ins[0] if len(ins) == 1 else ins)

    def _private_feed(self, xs: list[np.ndarray], h: np.ndarray | None = None) -> list[np.ndarray]:
        """What the enclave takes for the model inputs `xs` (one batch): the cut tensor
        (`h`, or the public part's output), then the model inputs the private part
        reads, in private.inputs order."""
        if h is None and self._public is not None:
            h = self._public_of(xs)
        return [h if i is None else xs[i] for i in self._private_from]  # type: ignore[misc]

    def _predict_pipelined(
        self, xs: list[np.ndarray], starts: range, batch_size: int, allow_nonfinite: bool
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
                xb = [a[s : s + batch_size] for a in xs]
                feed = self._private_feed(xb)  # overlaps the enclave's previous batch
                # poll=False: this thread must not keep taking the GIL from the public part.
                pending.append(pool.submit(self._infer, feed, allow_nonfinite, False))
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
        is why `ennclave audit` gives it to the attacker. (Without a public part: the
        model's first input.)"""
        xs = self._validate_all(x, allow_nonfinite=False)
        if self._public is None:
            return xs[0]
        step = max(1, int(batch_size))
        n = xs[0].shape[0]
        return np.concatenate(
            [self._public_of([a[s : s + step] for a in xs]) for s in range(0, n, step)], axis=0
        )

    @property
    def private_input_names(self) -> list[str]:
        """The private part's inputs: the cut tensor, then the model inputs it reads."""
        return [str(s.get("name", "")) for s in self._private_specs]

    def predict_private(self, h: Any, *, allow_nonfinite: bool = False) -> np.ndarray:
        """Run only the private part on the cut tensor `h` (raw policy output, float32
        `(N, values per sample)`). A private part of several inputs
        (`private_input_names`) takes a list in that order or a dict by name."""
        specs = self._private_specs
        if len(specs) == 1:
            if isinstance(h, (list, tuple)) and len(h) == 1:
                h = h[0]
            elif isinstance(h, dict) and list(h) == self.private_input_names:
                h = next(iter(h.values()))
            hs = [h]
        elif isinstance(h, dict):
            names = self.private_input_names
            missing = [n for n in names if n not in h]
            if missing:
                raise InputError(
                    f"The private part takes inputs {names}; the dict lacks {missing}."
                )
            hs = [h[n] for n in names]
        elif isinstance(h, (list, tuple)) and len(h) == len(specs):
            hs = list(h)
        else:
            raise InputError(
                f"The private part takes {len(specs)} inputs {self.private_input_names}; pass "
                "a list in this order or a dict by name."
            )
        arrs = []
        for a, spec in zip(hs, specs, strict=True):
            a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
            if a.ndim == 0 or a.shape[0] == 0:
                raise InputError("The input batch is empty; pass at least one sample.")
            if len(specs) > 1 and a[:1].size != _per_sample(spec["shape"]):
                raise InputError(
                    f"Private input {spec.get('name')!r} has shape {a.shape}, expected "
                    f"{list(spec['shape'])} (batch first)."
                )
            if not allow_nonfinite and not np.isfinite(a).all():
                raise InputError(
                    "The input contains NaN or infinity; clean it, or pass allow_nonfinite=True "
                    "(`ennclave run --allow-nonfinite`)."
                )
            arrs.append(a)
        if len({a.shape[0] for a in arrs}) > 1:
            raise InputError(
                f"The private inputs have different batch sizes {[a.shape[0] for a in arrs]}; "
                "pass the same number of samples for every input."
            )
        return self._infer(arrs, allow_nonfinite)

    def _infer(
        self, feed: list[np.ndarray], allow_nonfinite: bool, poll: bool = True
    ) -> np.ndarray:
        """Run the enclave on `feed` (the private inputs, one batch)."""
        relay = self._relay
        if relay is None:
            x = feed[0] if len(feed) == 1 else feed
            return self._worker.infer(x, allow_nonfinite=allow_nonfinite, poll=poll)
        h = feed[0]
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
            part = [a[s : s + take] for a in feed]
            outs.append(
                self._worker.infer(
                    part[0] if len(part) == 1 else part, allow_nonfinite=allow_nonfinite, poll=poll
                )
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
