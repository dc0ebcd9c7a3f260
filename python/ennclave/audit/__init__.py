"""Leakage audit of a bundle: what an attacker learns through the prediction API.

`stealing` (surrogate training), `membership` (threshold membership inference),
`metrics` (accuracy, fidelity, AUC, TEESlice normalisation), `oracle` (the attacker's
and the owner's view of a bundle), `runner` (audits of a bundle, a cut sweep, a policy
comparison), `report` (tables, JSON, plots). Needs Keras.
"""

from .runner import (
    AuditConfig,
    BundleAudit,
    CutsAudit,
    Dataset,
    PoliciesAudit,
    audit_bundle,
    audit_cuts,
    audit_policies,
    load_npz,
)
from .stealing import StealConfig

__all__ = [
    "AuditConfig",
    "BundleAudit",
    "CutsAudit",
    "Dataset",
    "PoliciesAudit",
    "StealConfig",
    "audit_bundle",
    "audit_cuts",
    "audit_policies",
    "load_npz",
]
