"""Small Keras models used across the tests (built here, never downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

L = keras.layers


def randomize_bn(model: keras.Model, seed: int = 0) -> None:
    """Give BatchNormalization layers non-trivial statistics, so folding is tested."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, n).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))


def _all_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def sequential_cnn() -> keras.Model:
    keras.utils.set_random_seed(1)
    m = keras.Sequential(
        [
            keras.Input((12, 12, 3), name="image"),
            L.Conv2D(6, 3, activation="relu", name="c1"),
            L.BatchNormalization(name="bn1"),
            L.MaxPooling2D(name="p1"),
            L.Conv2D(8, 3, padding="same", activation="elu", name="c2"),
            L.Flatten(name="flat"),
            L.Dense(16, activation="tanh", name="fc1"),
            L.Dropout(0.5, name="drop"),
            L.Dense(5, activation="softmax", name="fc2"),
        ],
        name="seq",
    )
    randomize_bn(m)
    return m


def residual_cnn() -> keras.Model:
    """Two residual blocks: cuts inside a block must not be offered."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((10, 10, 4), name="img")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    for b in (1, 2):
        r = L.Conv2D(8, 3, padding="same", name=f"block{b}_conv1")(x)
        r = L.BatchNormalization(name=f"block{b}_bn")(r)
        r = L.ReLU(name=f"block{b}_relu")(r)
        r = L.Conv2D(8, 3, padding="same", name=f"block{b}_conv2")(r)
        x = L.Add(name=f"block{b}_add")([x, r])
        x = L.Activation("relu", name=f"block{b}_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(3, activation="softmax", name="head")(x)
    m = keras.Model(inp, out, name="resnet")
    randomize_bn(m)
    return m


def nested_model() -> keras.Model:
    """A backbone model used as a layer inside the outer model."""
    keras.utils.set_random_seed(3)
    bb_in = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(bb_in)
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_b")(h)
    h = L.GlobalMaxPooling2D(name="gmp")(h)
    backbone = keras.Model(bb_in, h, name="backbone")
    inp = keras.Input((8, 8, 2), name="x")
    y = backbone(inp)
    y = L.Dense(6, activation="relu", name="fc")(y)
    y = L.Dense(2, name="logits")(y)
    return keras.Model(inp, y, name="outer")


def transfer_model() -> tuple[keras.Model, keras.Model]:
    """(public base backbone, full model): frozen copy of the base + a trainable head."""
    keras.utils.set_random_seed(4)
    base = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, activation="relu", name="b_conv1"),
            L.Conv2D(4, 3, activation="relu", name="b_conv2"),
            L.GlobalAveragePooling2D(name="b_gap"),
        ],
        name="base",
    )
    base.trainable = False
    inp = keras.Input((8, 8, 3), name="x")
    h = base(inp)
    h = L.Dense(8, activation="relu", name="head1")(h)
    out = L.Dense(3, activation="softmax", name="head2")(h)
    return base, keras.Model(inp, out, name="transfer")
