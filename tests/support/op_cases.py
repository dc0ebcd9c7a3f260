"""One tiny Keras model per supported layer/option: each exercises one program op.

Shared by the reference-vs-Keras tests and the worker-vs-reference tests.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from ennclave.adapters.keras import ACTIVATION_NAMES
from support.keras_models import L, randomize_bn


def _single(shape: tuple[int, ...], *layers) -> keras.Model:
    inp = keras.Input(shape)
    x = inp
    for layer in layers:
        x = layer(x)
    return keras.Model(inp, x)


def _merge(merge_layer) -> keras.Model:
    inp = keras.Input((5, 6))
    a = L.Dense(4, name="a")(inp)
    b = L.Dense(4, name="b")(inp)
    c = L.Dense(4, name="c")(inp)
    return keras.Model(inp, merge_layer([a, b, c]))


def _bn() -> keras.Model:
    m = _single((6, 6, 3), L.Conv2D(4, 3, activation="relu"), L.BatchNormalization())
    randomize_bn(m)
    return m


def _normalization(axis: int | tuple[int, ...], invert: bool = False) -> keras.Model:
    norm = L.Normalization(axis=axis, invert=invert)
    norm.adapt(np.random.default_rng(5).normal(0.5, 2.0, (32, 3, 4)).astype("float32"))
    return _single((3, 4), norm)


def _layer_scale() -> keras.Model:
    from keras.src.applications.convnext import LayerScale

    m = _single((3, 3, 4), L.Conv2D(4, 1), LayerScale(1e-6, 4))
    scale = m.layers[-1]
    scale.gamma.assign(np.random.default_rng(6).uniform(0.5, 1.5, 4).astype("float32"))
    return m


def _erf_ops() -> keras.Model:
    inp = keras.Input((5,))
    a = keras.ops.erfc(L.Dense(4)(inp))
    b = keras.ops.erf(L.Dense(4)(inp))
    return keras.Model(inp, L.Add()([a, b]))


def _ops_with_constants() -> keras.Model:
    # x + 3.0, 3.0 - x, x / 2, max(x, 0.5) · c: keras.ops calls on one tensor and constants.
    inp = keras.Input((5,))
    x = L.Dense(4)(inp)
    y = keras.ops.maximum((3.0 - (x + 3.0)) / 2.0, 0.5) * np.array([1, 2, 3, 4], "float32")
    return keras.Model(inp, L.Dense(2)(y))


def _squeeze_expand_ops() -> keras.Model:
    inp = keras.Input((3, 4))
    x = keras.ops.expand_dims(L.Dense(2)(inp), 2)  # [N, 3, 1, 2]
    x = keras.ops.squeeze(L.Conv2D(3, (2, 1))(x), axis=2)  # [N, 2, 3]
    return keras.Model(inp, L.Dense(2)(x))


def _mha(causal: bool = False, cross: bool = False) -> keras.Model:
    inp = keras.Input((5, 8))
    h = L.Dense(8)(inp)
    mha = L.MultiHeadAttention(2, 4, value_dim=3, name="mha")
    if cross:
        other = L.Dense(6)(inp)
        y = mha(h, other, use_causal_mask=causal)
    else:
        y = mha(h, h, use_causal_mask=causal)
    return keras.Model(inp, y)


def _encoder_block() -> keras.Model:
    # Post-norm transformer block: attention, residual, layer norm, gelu MLP.
    inp = keras.Input((6, 8))
    a = L.MultiHeadAttention(2, 4)(inp, inp)
    x = L.LayerNormalization(epsilon=1e-5)(L.Add()([inp, a]))
    f = L.Dense(8)(L.Dense(16, activation="gelu")(x))
    x = L.LayerNormalization(epsilon=1e-5)(L.Add()([x, f]))
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(x)))


def _where_cast() -> keras.Model:
    # keras.ops.cast to int32 (truncation) and bool, keras.ops.where with a tensor and a
    # constant branch: the `cast` and `where` program ops.
    inp = keras.Input((3, 5))
    d = L.Dense(4)(inp)
    flag = keras.ops.cast(keras.ops.cast(d * 2.0, "int32"), "bool")
    y = keras.ops.where(flag, d, -0.25)
    z = keras.ops.where(keras.ops.cast(d, "bool"), y, d * 3.0)
    return keras.Model(inp, L.Dense(2)(z + keras.ops.cast(d * 4.0, "int32")))


# Every activation the Keras adapter lowers.
ACTIVATIONS = sorted(ACTIVATION_NAMES)

CASES: dict[str, Callable[[], keras.Model]] = {
    "dense": lambda: _single((7,), L.Dense(5, activation="relu")),
    "dense_nobias_3d": lambda: _single((3, 7), L.Dense(4, use_bias=False)),
    "conv1d_valid": lambda: _single((11, 3), L.Conv1D(4, 3)),
    "conv1d_same_stride": lambda: _single((11, 3), L.Conv1D(4, 4, strides=2, padding="same")),
    "conv1d_causal_dilated": lambda: _single(
        (11, 3), L.Conv1D(4, 3, padding="causal", dilation_rate=2)
    ),
    "conv1d_groups": lambda: _single((9, 4), L.Conv1D(6, 3, groups=2, padding="same")),
    "conv2d_valid": lambda: _single((7, 8, 3), L.Conv2D(5, (3, 2))),
    "conv2d_same_stride2": lambda: _single(
        (9, 9, 3), L.Conv2D(4, 3, strides=2, padding="same", activation="relu6")
    ),
    "conv2d_dilated": lambda: _single((10, 10, 2), L.Conv2D(3, 3, dilation_rate=2)),
    "conv2d_groups": lambda: _single((6, 6, 4), L.Conv2D(6, 3, groups=2, padding="same")),
    "depthwise2d": lambda: _single(
        (8, 8, 3), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", strides=2)
    ),
    "depthwise1d": lambda: _single((10, 3), L.DepthwiseConv1D(3, depth_multiplier=1)),
    "separable2d": lambda: _single(
        (8, 8, 3), L.SeparableConv2D(5, 3, padding="same", activation="relu")
    ),
    "separable1d": lambda: _single((10, 3), L.SeparableConv1D(4, 3, depth_multiplier=2)),
    "maxpool2d_valid": lambda: _single((7, 7, 2), L.MaxPooling2D(2)),
    "maxpool2d_same": lambda: _single((7, 7, 2), L.MaxPooling2D(3, strides=2, padding="same")),
    "avgpool2d_same": lambda: _single((7, 7, 2), L.AveragePooling2D(3, strides=2, padding="same")),
    "avgpool2d_valid": lambda: _single((8, 8, 2), L.AveragePooling2D(2)),
    "maxpool1d_same": lambda: _single((9, 3), L.MaxPooling1D(2, padding="same")),
    "avgpool1d_same": lambda: _single((9, 3), L.AveragePooling1D(3, strides=2, padding="same")),
    "gap2d": lambda: _single((5, 5, 3), L.GlobalAveragePooling2D()),
    "gmp2d_keepdims": lambda: _single((5, 5, 3), L.GlobalMaxPooling2D(keepdims=True)),
    "gap1d": lambda: _single((6, 3), L.GlobalAveragePooling1D()),
    "gmp1d": lambda: _single((6, 3), L.GlobalMaxPooling1D()),
    "zeropad2d": lambda: _single((4, 5, 2), L.ZeroPadding2D(((1, 2), (0, 3))), L.Conv2D(2, 2)),
    "zeropad1d": lambda: _single((5, 2), L.ZeroPadding1D((2, 1)), L.Conv1D(2, 2)),
    "flatten": lambda: _single((3, 4, 2), L.Flatten(), L.Dense(3)),
    "reshape": lambda: _single((12,), L.Reshape((3, 4)), L.Dense(2)),
    "batchnorm": _bn,
    "layernorm": lambda: _single((4, 6), L.LayerNormalization()),
    "layernorm_2axes": lambda: _single((4, 6), L.LayerNormalization(axis=[1, 2])),
    "add": lambda: _merge(L.Add()),
    "subtract": lambda: (lambda i: keras.Model(i, L.Subtract()([L.Dense(3)(i), L.Dense(3)(i)])))(
        keras.Input((4,))
    ),
    "multiply": lambda: _merge(L.Multiply()),
    "average": lambda: _merge(L.Average()),
    "maximum": lambda: _merge(L.Maximum()),
    "minimum": lambda: _merge(L.Minimum()),
    "concatenate": lambda: _merge(L.Concatenate(axis=1)),
    "dropout": lambda: _single((5,), L.Dense(4), L.Dropout(0.5), L.Dense(2)),
    "relu_max6": lambda: _single((5,), L.Dense(4), L.ReLU(max_value=6.0)),
    "relu_slope": lambda: _single((5,), L.Dense(4), L.ReLU(negative_slope=0.3)),
    "leakyrelu": lambda: _single((5,), L.Dense(4), L.LeakyReLU(negative_slope=0.1)),
    "elu_layer": lambda: _single((5,), L.Dense(4), L.ELU(alpha=0.5)),
    "softmax_axis1": lambda: _single((3, 4), L.Softmax(axis=1)),
    "upsampling2d_nearest": lambda: _single((3, 4, 2), L.UpSampling2D((2, 3))),
    "upsampling2d_bilinear": lambda: _single(
        (3, 4, 2), L.UpSampling2D((2, 3), interpolation="bilinear")
    ),
    "upsampling1d": lambda: _single((4, 3), L.UpSampling1D(3)),
    "conv2d_transpose_same": lambda: _single(
        (4, 5, 3), L.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu")
    ),
    "conv2d_transpose_valid": lambda: _single((4, 4, 2), L.Conv2DTranspose(3, (2, 3), (1, 2))),
    "conv2d_transpose_kernel_below_stride": lambda: _single(
        (3, 3, 2), L.Conv2DTranspose(2, 2, strides=3)
    ),
    "conv2d_transpose_output_padding": lambda: _single(
        (3, 4, 2), L.Conv2DTranspose(3, 4, strides=3, padding="same", output_padding=(2, 1))
    ),
    "conv1d_transpose": lambda: _single((5, 3), L.Conv1DTranspose(4, 3, strides=2, padding="same")),
    "cropping2d": lambda: _single((6, 5, 2), L.Cropping2D(((1, 2), (0, 1))), L.Conv2D(2, 2)),
    "cropping1d": lambda: _single((6, 3), L.Cropping1D((2, 1))),
    "rescaling": lambda: _single((4, 4, 3), L.Rescaling(1 / 127.5, offset=-1.0)),
    "rescaling_per_channel": lambda: _single(
        (4, 3), L.Dense(3), L.Rescaling([0.5, 2.0, -1.0], offset=[0.1, 0.2, 0.3])
    ),
    "normalization": lambda: _normalization(-1),
    "normalization_invert": lambda: _normalization(-1, invert=True),
    "normalization_2axes": lambda: _normalization((1, 2)),
    "layer_scale": _layer_scale,
    "erf_erfc_ops": _erf_ops,
    "squeeze_expand_dims_ops": _squeeze_expand_ops,
    "ops_with_constants": _ops_with_constants,
    "einsum_dense_2d": lambda: _single((7,), L.EinsumDense("ab,bc->ac", 4, bias_axes="c")),
    "einsum_dense_heads": lambda: _single(
        (3, 6), L.EinsumDense("abc,cde->abde", (3, 2, 4), bias_axes="de", activation="relu")
    ),
    "einsum_dense_merge_heads": lambda: _single(
        (3, 2, 4), L.EinsumDense("abcd,cde->abe", (3, 5), bias_axes="e")
    ),
    "einsum_dense_transposed_bias_seq": lambda: _single(
        (3, 6), L.EinsumDense("abc,cd->adb", (4, 3), bias_axes="b")
    ),
    "einsum_dense_ellipsis": lambda: _single((3, 6), L.EinsumDense("...b,bc->...c", 4)),
    "mha_self": _mha,
    "mha_cross_causal": lambda: _mha(causal=True, cross=True),
    "encoder_block": _encoder_block,
    "where_cast_ops": _where_cast,
    **{f"act_{a}": (lambda a=a: _single((6,), L.Dense(5), L.Activation(a))) for a in ACTIVATIONS},
}
