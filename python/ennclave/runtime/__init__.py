"""Client side: open a bundle and run it (`EnclavedModel`), the enclave worker client
(`WorkerClient`), and a Keras layer for the private part (`keras_layer.EnclaveLayer`,
imported separately because it needs Keras)."""

from .model import EnclavedModel, TopK, load
from .worker import WorkerClient, find_worker_binary

__all__ = ["EnclavedModel", "TopK", "WorkerClient", "find_worker_binary", "load"]
