"""Every error ennclave raises on purpose: one sentence, what happened and what to do.

The CLI prints `str(error)` of an `EnnclaveError` without a traceback.
"""


class EnnclaveError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class ModelLoadError(EnnclaveError):
    """The model file cannot be read or uses something we do not support."""


class UnsupportedOpError(EnnclaveError):
    """The private part contains a layer/op the enclave program cannot express."""


class CutError(EnnclaveError):
    """The requested cut is not a valid single-tensor boundary."""


class ProgramError(EnnclaveError):
    """An enclave program is malformed."""


class VerificationError(EnnclaveError):
    """The split model does not reproduce the original within tolerance."""


class BundleError(EnnclaveError):
    """A bundle is missing files, damaged, or of an unknown version."""


class InputError(EnnclaveError):
    """An input array or argument has the wrong shape, dtype or value."""
