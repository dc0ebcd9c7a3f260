"""Model stealing: train surrogates of the private part from the API's answers.

Two attackers see the same queries and the same answers:

* **public-part attacker** (what a bundle holder really is): runs the public layers
  (`EnclavedModel.public_features`) and trains only a surrogate head on their output;
* **black-box attacker** (the reference where nothing is public): the same public
  *architecture* re-initialised (`keras.models.clone_model`) plus the same head,
  trained from random initialisation on the raw inputs — as if the whole model were
  in the enclave and only its architecture were known.

The attacker does not know the private architecture (it is sealed), so the head is a
generic MLP: Flatten → BatchNorm → Dense(hidden, relu) → Dense(classes, softmax).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from .metrics import accuracy, fidelity


@dataclass
class StealConfig:
    hidden: int = 128
    epochs: int = 20
    min_steps: int = 300  # small budgets still get enough updates to converge
    max_steps: int = 1500  # bounds the cost of large budgets on a 2-core machine
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class SurrogateResult:
    attacker: str  # "public-part" or "black-box"
    targets: str  # what it trained on: "probs", "top_k" or "label"
    budget: int  # queries the attacker asked for
    queries: int  # answers it actually got (the bundle's budget may stop it earlier)
    accuracy: float  # on the test set's true labels
    fidelity: float  # agreement with the victim's labels on the test set
    epochs: int
    seconds: float


def surrogate_head(feature_shape: tuple[int, ...], n_classes: int, hidden: int) -> Any:
    keras = require("keras")
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(feature_shape),
            L.Flatten(),
            # Cut tensors can have any scale (e.g. pooled activations ~0.1): normalising
            # keeps the number of updates the attack needs independent of it.
            L.BatchNormalization(momentum=0.9),  # few updates: forget the init fast
            L.Dense(hidden, activation="relu"),
            L.Dense(n_classes, activation="softmax"),
        ],
        name="surrogate_head",
    )


def load_public_keras(bundle: str | Path) -> Any | None:
    """The bundle's public Keras model (any holder can load it), or None when the cut is
    at the input or the public part is ONNX (no architecture to clone in Keras)."""
    from ..bundle import read_manifest

    manifest, _ = read_manifest(Path(bundle))
    pub = manifest.get("public")
    if not pub or pub.get("framework") != "keras":
        return None
    keras = require("keras")
    return keras.saving.load_model(Path(bundle) / pub["file"], compile=False)


def blackbox_model(
    public: Any | None, input_shape: tuple[int, ...], n_classes: int, hidden: int
) -> Any:
    """Re-initialised public architecture + the surrogate head, all trainable."""
    keras = require("keras")
    inp = keras.Input(input_shape)
    if public is None:
        return keras.Model(inp, surrogate_head(input_shape, n_classes, hidden)(inp))
    clone = keras.models.clone_model(public)  # same layers, fresh weights
    clone.trainable = True  # the owner froze the backbone; the attacker trains it
    h = clone(inp)
    head = surrogate_head(tuple(int(d) for d in h.shape[1:]), n_classes, hidden)
    return keras.Model(inp, head(h), name="blackbox_surrogate")


def train(model: Any, x: np.ndarray, targets: np.ndarray, cfg: StealConfig) -> int:
    """Fit on soft (or one-hot) targets; returns the epochs run."""
    keras = require("keras")
    keras.utils.set_random_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(x) / cfg.batch_size))
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    epochs = max(1, min(epochs, cfg.max_steps // steps_per_epoch))
    model.compile(keras.optimizers.Adam(cfg.learning_rate), "categorical_crossentropy")
    model.fit(x, targets, epochs=epochs, batch_size=cfg.batch_size, verbose=0, shuffle=True)
    return epochs


def predict_probs(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=512, verbose=0), dtype=np.float32)


def fit_and_score(
    model: Any,
    attacker: str,
    target_kind: str,
    budget: int,
    x_train: np.ndarray,
    targets: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    victim_test_labels: np.ndarray,
    cfg: StealConfig,
) -> SurrogateResult:
    t0 = time.perf_counter()
    epochs = train(model, x_train, targets, cfg)
    pred = np.argmax(predict_probs(model, x_test), axis=1)
    return SurrogateResult(
        attacker=attacker,
        targets=target_kind,
        budget=budget,
        queries=len(x_train),
        accuracy=accuracy(pred, y_test),
        fidelity=fidelity(pred, victim_test_labels),
        epochs=epochs,
        seconds=round(time.perf_counter() - t0, 2),
    )
