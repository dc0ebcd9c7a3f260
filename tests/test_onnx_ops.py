"""ONNX operators added for exported models (Resize/Upsample, ConvTranspose, Slice,
Split): each checked against ONNX Runtime at every cut (`check_all_cuts`) and, at the
first cut, through the real worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402

import ennclave  # noqa: E402
from ennclave.adapters.onnx import OnnxAdapter  # noqa: E402
from ennclave.errors import ModelLoadError, UnsupportedOpError  # noqa: E402
from ennclave.graph import find_cut_points  # noqa: E402
from ennclave.split import split_model  # noqa: E402
from support import kernels as kernel_families  # noqa: E402
from test_onnx_adapter import c, check_all_cuts, save_model, w  # noqa: E402

N = helper.make_node
I64 = np.int64


def through_worker(path: Path, tmp: Path) -> None:
    """Cut 0 (the whole model private), sealed and run by the worker."""
    ad = OnnxAdapter(path)
    x = ad.random_inputs(5, np.random.default_rng(3))
    out = tmp / f"{path.stem}_bundle"
    split_model(ad, 0, out, keystore=tmp / "ks.json", n_random=4)
    with ennclave.load(out, keystore=tmp / "ks.json") as m:
        got = m.predict(x, batch_size=2)  # ragged last batch
    np.testing.assert_allclose(got, ad.predict(x), atol=1e-4, rtol=1e-4)


@pytest.fixture(params=kernel_families.KERNELS)
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each fp32 kernel family of the worker; the checks that do not involve the worker
    run with the best one only."""
    kernel_families.use(request.param, monkeypatch)
    return request.param


def _resize(name: str, x: str, y: str, scales: str = "", sizes: str = "", **attrs) -> object:
    ins = [x, "", scales] + ([sizes] if sizes else [])
    return N("Resize", ins, [y], name=name, **attrs)


def resize_model(tmp: Path) -> Path:
    nodes = [
        # nearest x2 / x3 (integer scales, asymmetric + floor: what exporters write)
        _resize(
            "up_nearest",
            "x",
            "r1",
            scales="s23",
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        N("Conv", ["r1", "k1"], ["c1"], pads=[1, 1, 1, 1]),
        # linear to an odd size given by sizes = Concat(Shape(x)[:2], [7, 9])
        N("Shape", ["c1"], ["shp"]),
        N("Slice", ["shp", "z1", "two", "z1"], ["nc"]),
        N("Concat", ["nc", "hw"], ["sizes"], axis=0),
        _resize("lin_half", "c1", "r2", sizes="sizes", mode="linear"),
        _resize(
            "lin_align",
            "r2",
            "r3",
            scales="s15",
            mode="linear",
            coordinate_transformation_mode="align_corners",
        ),
        _resize(
            "lin_pytorch",
            "r3",
            "r4",
            scales="s07",
            mode="linear",
            coordinate_transformation_mode="pytorch_half_pixel",
        ),
        _resize(
            "lin_asym",
            "r4",
            "r5",
            scales="s13",
            mode="linear",
            coordinate_transformation_mode="asymmetric",
        ),
        _resize(
            "near_half",
            "r5",
            "y",
            scales="s15",
            mode="nearest",
            coordinate_transformation_mode="half_pixel",
            nearest_mode="round_prefer_ceil",
        ),
    ]
    inits = [
        c("s23", [1, 1, 2, 3]),
        w("k1", 3, 2, 3, 3),
        c("z1", [0], I64),
        c("two", [2], I64),
        c("hw", [7, 9], I64),
        c("s15", [1, 1, 1.5, 1.5]),
        c("s07", [1, 1, 0.75, 0.6]),
        c("s13", [1, 1, 1.3, 1.0]),
    ]
    # 3x4 -> 6x12 -> 7x9 -> 10x13 -> 7x7 -> 9x7 -> 13x10
    return save_model(tmp, "resize", nodes, [2, 3, 4], [3, 13, 10], inits)


def test_resize_modes(tmp: Path, kernels: str) -> None:
    path = resize_model(tmp)
    if kernels == kernel_families.best():
        cuts = check_all_cuts(path, tmp)
        assert len(cuts) >= 7
    through_worker(path, tmp)


def test_resize_1d_opset18_axes_and_upsample(tmp: Path) -> None:
    nodes = [
        N(
            "Resize",
            ["x", "", "", "sz"],
            ["r1"],
            mode="linear",
            axes=[2],
            coordinate_transformation_mode="half_pixel",
        ),
        N(
            "Resize",
            ["r1", "", "sc"],
            ["y"],
            mode="nearest",
            axes=[-1],
            coordinate_transformation_mode="tf_half_pixel_for_nn",
        ),
    ]
    path = save_model(
        tmp, "resize1d", nodes, [3, 5], [3, 16], [c("sz", [8], I64), c("sc", [2.0])], opset=19
    )
    check_all_cuts(path, tmp)


def test_upsample_opset9(tmp: Path) -> None:
    # Upsample (opset 7-9): asymmetric coordinates, nearest rounds down.
    nodes = [N("Upsample", ["x", "s"], ["y"], mode="nearest")]
    path = save_model(tmp, "upsample", nodes, [2, 3, 3], [2, 6, 9], [c("s", [1, 1, 2, 3])], 9)
    try:
        OnnxAdapter(path)
    except ModelLoadError:
        pytest.skip("this adapter does not read opset 9 models")
    check_all_cuts(path, tmp)


def test_resize_unsupported_modes_name_the_node(tmp: Path) -> None:
    nodes = [_resize("cubic_up", "x", "y", scales="s", mode="cubic")]
    path = save_model(tmp, "cubic", nodes, [2, 3, 3], [2, 6, 6], [c("s", [1, 1, 2, 2])])
    ad = OnnxAdapter(path)
    with pytest.raises(UnsupportedOpError, match=r"cubic_up.*mode=cubic"):
        ad.lower_private(find_cut_points(ad.graph)[0])
    nodes = [_resize("all_axes", "x", "y", scales="s", mode="nearest")]
    path = save_model(tmp, "allaxes", nodes, [2, 3], [4, 6], [c("s", [1, 2, 2])])
    ad = OnnxAdapter(path)
    with pytest.raises(UnsupportedOpError, match=r"all_axes.*no channel axis"):
        ad.lower_private(find_cut_points(ad.graph)[0])


def test_resize_channels_last_and_any_axes(tmp: Path) -> None:
    # NHWC (scales on axes 1, 2: the last axis is the channel axis) and a resize of
    # axis 1 of an NCHW tensor (then the last axis is the program's channel axis).
    nodes = [
        _resize("nhwc", "x", "r", scales="s1", mode="linear"),
        _resize("axis1", "r", "y", scales="s2", mode="nearest", nearest_mode="floor"),
    ]
    inits = [c("s1", [1, 2, 1.5, 1]), c("s2", [1, 2, 1, 1])]
    path = save_model(tmp, "nhwc", nodes, [3, 4, 2], [12, 6, 2], inits)
    check_all_cuts(path, tmp)


def conv_transpose_model(tmp: Path) -> Path:
    nodes = [
        # strides 2, explicit pads, output_padding, dilation, groups
        N(
            "ConvTranspose",
            ["x", "k1", "b1"],
            ["t1"],
            strides=[2, 2],
            pads=[1, 0, 0, 1],
            output_padding=[1, 0],
            dilations=[1, 2],
            group=2,
            name="ct_grouped",
        ),
        N("Relu", ["t1"], ["r1"]),
        # auto_pad SAME_UPPER: output = input * stride
        N("ConvTranspose", ["r1", "k2"], ["t2"], strides=[2, 1], auto_pad="SAME_UPPER"),
        # output_shape given: pads are derived
        N(
            "ConvTranspose",
            ["t2", "k3", "b3"],
            ["y"],
            strides=[3, 2],
            output_shape=[41, 15],
            name="ct_shape",
        ),
    ]
    inits = [
        w("k1", 4, 3, 3, 2),  # Cin 4, Cout/g 3, 3x2 kernel, groups 2 -> Cout 6
        w("b1", 6),
        w("k2", 6, 2, 4, 3),
        w("k3", 2, 3, 2, 2),
        w("b3", 3),
    ]
    # 3x4 -> (2*2+3+1-1=7) x (3*2+2*1+1-1=8) -> 14x8 -> 41x15
    return save_model(tmp, "convt", nodes, [4, 3, 4], [3, 41, 15], inits)


def test_conv_transpose(tmp: Path, kernels: str) -> None:
    path = conv_transpose_model(tmp)
    if kernels == kernel_families.best():
        check_all_cuts(path, tmp)
    through_worker(path, tmp)


def test_conv_transpose_1d_and_same_lower(tmp: Path) -> None:
    nodes = [
        N("ConvTranspose", ["x", "k1", "b1"], ["t"], strides=[3], pads=[2, 1], output_padding=[2]),
        N("ConvTranspose", ["t", "k2"], ["y"], strides=[2], auto_pad="SAME_LOWER"),
    ]
    inits = [w("k1", 3, 4, 4), w("b1", 4), w("k2", 4, 2, 3)]
    # 5 -> 4*3+4+2-3 = 15 -> 30
    path = save_model(tmp, "convt1d", nodes, [3, 5], [2, 30], inits)
    check_all_cuts(path, tmp)


def slice_split_model(tmp: Path) -> Path:
    nodes = [
        N("Conv", ["x", "k"], ["h"]),  # [N, 6, 6, 6]
        # negative indices, step 2, INT_MAX end, axes negative
        N("Slice", ["h", "st1", "en1", "ax1", "sp1"], ["s1"], name="slice_strided"),
        # reversed channels (step -1 from the end) and a no-op full batch slice
        N("Slice", ["s1", "st2", "en2", "ax2", "sp2"], ["s2"], name="slice_reversed"),
        # Split along channels in sizes [1, 3, 2]; all three outputs used
        N("Split", ["s2", "parts"], ["a", "b", "cc"], axis=1, name="split"),
        N("Relu", ["b"], ["rb"]),
        N("Concat", ["cc", "a", "rb"], ["cat"], axis=1),
        # Split along width into equal halves, only the second one used
        N("Split", ["cat"], ["left", "right"], axis=-1, name="split_eq"),
        N("Tanh", ["right"], ["y"]),
    ]
    big = 2**63 - 1
    inits = [
        w("k", 6, 3, 2, 2),
        c("st1", [-5, 1], I64),
        c("en1", [big, -1], I64),
        c("ax1", [-2, -1], I64),
        c("sp1", [2, 1], I64),
        c("st2", [0, -1], I64),
        c("en2", [big, -big], I64),
        c("ax2", [0, 1], I64),
        c("sp2", [1, -1], I64),
        c("parts", [1, 3, 2], I64),
    ]
    # h: [6, 6, 6]; s1: rows 1,3,5 and cols 1..4 -> [6, 3, 4]; s2 reversed channels
    return save_model(tmp, "slicesplit", nodes, [3, 7, 7], [6, 3, 2], inits)


def test_slice_and_split(tmp: Path, kernels: str) -> None:
    path = slice_split_model(tmp)
    if kernels == kernel_families.best():
        cuts = check_all_cuts(path, tmp)
        assert "b" not in {cut.tensor.name for cut in cuts}  # a Split output is no cut
    through_worker(path, tmp)


def test_split_opset18_num_outputs_and_batch_axis(tmp: Path) -> None:
    nodes = [
        N("Split", ["x"], ["a", "b", "cc"], axis=1, num_outputs=3),
        N("Concat", ["cc", "b", "a"], ["y"], axis=1),
    ]
    path = save_model(tmp, "split18", nodes, [7, 2], [7, 2], [], opset=18)
    check_all_cuts(path, tmp)
    nodes = [N("Slice", ["x", "st", "en", "ax"], ["y"], name="batch_slice")]
    inits = [c("st", [1], I64), c("en", [3], I64), c("ax", [0], I64)]
    path = save_model(tmp, "batchslice", nodes, [4], [4], inits)
    ad = OnnxAdapter(path)
    with pytest.raises(UnsupportedOpError, match=r"batch_slice.*batch axis"):
        ad.lower_private(find_cut_points(ad.graph)[0])


@pytest.fixture()
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_keras_decoder_through_tf2onnx(tmp: Path, kernels: str) -> None:
    """A Keras decoder exported by tf2onnx: Rescaling, Conv2DTranspose (same/valid),
    UpSampling2D nearest (Unsqueeze -> Tile -> Reshape) and bilinear (Resize),
    Cropping2D (Slice); every cut against ONNX Runtime, cut 0 through the worker."""
    keras = pytest.importorskip("keras")
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = L.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu")(x)
    x = L.UpSampling2D(2)(x)
    x = L.Cropping2D(((1, 2), (2, 1)))(x)
    x = L.UpSampling2D((1, 2), interpolation="bilinear")(x)
    x = L.Conv2DTranspose(3, 4, strides=2, activation="relu")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    model(np.zeros((1, 4, 4, 3), np.float32))
    path = tmp / "decoder.onnx"
    model.export(path, format="onnx", verbose=False)
    if kernels == kernel_families.best():
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"ConvTranspose", "Resize", "Tile", "Slice"} <= ops, ops
        check_all_cuts(path, tmp)
    through_worker(path, tmp)


def test_docs_list_every_supported_op() -> None:
    """docs/enclave-program.md lists exactly what the adapters translate."""
    import re

    from ennclave.adapters.onnx import SUPPORTED_OPS

    text = (Path(__file__).parents[1] / "docs" / "enclave-program.md").read_text()
    section = text[text.index("## What lowers to these ops") :]
    onnx_par = section[section.index("**ONNX operators**") : section.index("**Keras layers**")]
    listed = set(re.findall(r"\b([A-Z][A-Za-z0-9]+)\b", onnx_par.split(":", 1)[1]))
    assert listed == set(SUPPORTED_OPS), sorted(listed ^ set(SUPPORTED_OPS))
    pytest.importorskip("keras")
    from ennclave.adapters.keras import SUPPORTED_LAYERS

    keras_par = section[section.index("**Keras layers**") : section.index("How the newer")]
    # "Conv1D/2D" names Conv1D and Conv2D; "SpatialDropout1D/2D/3D" three layers.
    expanded = re.sub(
        r"\b([A-Za-z]+)1D((?:/[23]D)+)",
        lambda m: " ".join(f"{m.group(1)}{p}" for p in ["1D", *m.group(2)[1:].split("/")]),
        keras_par,
    )
    missing = [t for t in SUPPORTED_LAYERS if not re.search(rf"\b{t}\b", expanded)]
    assert not missing, f"not in docs/enclave-program.md: {missing}"


def test_squeeze_unsqueeze_any_non_batch_axis(tmp: Path) -> None:
    nodes = [
        N("Unsqueeze", ["x", "ax_u"], ["u"]),  # [N, 3, 4] -> [N, 3, 1, 4, 1]
        N("Mul", ["u", "m"], ["t"]),
        N("Squeeze", ["t", "ax_s"], ["s"]),  # negative axes: -> [N, 3, 4]
        N("Unsqueeze", ["s", "ax_1"], ["cin"]),  # -> [N, 1, 3, 4]
        N("Conv", ["cin", "k"], ["y"]),  # -> [N, 2, 2, 3]
    ]
    inits = [
        c("ax_u", [-1, 2], I64),
        w("m", 3, 1, 4, 1),
        c("ax_s", [-1, -3], I64),
        c("ax_1", [1], I64),
        w("k", 2, 1, 2, 2),
    ]
    path = save_model(tmp, "squeeze", nodes, [3, 4], [2, 2, 3], inits)
    check_all_cuts(path, tmp)
    nodes = [N("Unsqueeze", ["x", "ax0"], ["y"], name="batch_unsqueeze")]
    path = save_model(tmp, "unsq0", nodes, [4], [1, 4], [c("ax0", [0], I64)])
    ad = OnnxAdapter(path)
    with pytest.raises(UnsupportedOpError, match="batch_unsqueeze"):
        ad.lower_private(find_cut_points(ad.graph)[0])
