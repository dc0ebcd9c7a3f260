"""ennclave: cut a trained network into public layers that run in their framework and
private layers that are sealed and computed only inside an enclave.

Owner side:  `plan_model`, `split_model`.   Client side: `load(bundle).predict(x)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .runtime.model import EnclavedModel


def load(bundle: str, **kwargs: Any) -> EnclavedModel:
    """Open a bundle for inference: public part in its framework, private part in the
    enclave worker. See `ennclave.runtime.model.EnclavedModel`."""
    from .runtime.model import load as _load

    return _load(bundle, **kwargs)


def plan_model(
    model: str,
    budget_mib: float = 64.0,
    public_base: str | None = None,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    output: str | None = None,
):
    """Valid cut points of a model file with their costs, and a recommended cut.
    `input_shapes` and `output` as for `ennclave.adapters.load_model`."""
    from .adapters import load_model
    from .plan import make_plan

    base = load_model(public_base, input_shapes, output) if public_base else None
    return make_plan(load_model(model, input_shapes, output), budget_mib, base)


def split_model(*args: Any, **kwargs: Any):
    """Cut, lower, verify and seal a model into a bundle; see `ennclave.split.split_model`."""
    from .split import split_model as _split

    return _split(*args, **kwargs)


__all__ = ["__version__", "load", "plan_model", "split_model"]
