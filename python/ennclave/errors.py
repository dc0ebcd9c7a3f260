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


class AuthenticationError(BundleError):
    """The sealed program did not authenticate: wrong data key, or the manifest or the
    sealed file was changed after sealing."""


class KeyNotFound(EnnclaveError):
    """The bundle's data key is not in the keystore."""


class WorkerNotFound(EnnclaveError):
    """The enclave worker binary (`ennclave-enclave`) cannot be found."""


class WorkerError(EnnclaveError):
    """The enclave worker refused a request or failed to start; it keeps serving unless
    `fatal` is set."""

    def __init__(self, message: str, code: int = 0, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


class WorkerCrashed(WorkerError):
    """The enclave worker process died while (or before) serving a request; the next
    call starts a fresh worker."""


class LicenceError(WorkerError):
    """The key server's licence does not allow this: expired, forged, issued to another
    worker, or missing where the bundle needs one. Enforced inside the worker (error
    codes 12 and 13) and checked by the host runtime as well."""


class QueryBudgetExhausted(WorkerError):
    """The bundle's output policy allows no more queries (`max_queries`)."""
