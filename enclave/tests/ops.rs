//! Op-level tests through the full program → executor path, against naive loops.

mod common;
use common::*;
use ennclave_enclave::ops::dense;
use ennclave_enclave::program::{fuse_conv_pools, Program};

/// Naive channels-last 2-D conv, f64 accumulation.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    n: usize,
    h: usize,
    wd: usize,
    c: usize,
    k: &[f32],
    kh: usize,
    kw: usize,
    cout: usize,
    groups: usize,
    s: (usize, usize),
    d: (usize, usize),
    p: ((usize, usize), (usize, usize)),
    bias: Option<&[f32]>,
) -> (Vec<f32>, usize, usize) {
    let oh = (h + p.0 .0 + p.0 .1 - (d.0 * (kh - 1) + 1)) / s.0 + 1;
    let ow = (wd + p.1 .0 + p.1 .1 - (d.1 * (kw - 1) + 1)) / s.1 + 1;
    let (cig, cog) = (c / groups, cout / groups);
    let mut y = vec![0.0f32; n * oh * ow * cout];
    for b in 0..n {
        for i in 0..oh {
            for j in 0..ow {
                for o in 0..cout {
                    let g = o / cog;
                    let mut acc = bias.map_or(0.0, |b| b[o]) as f64;
                    for a in 0..kh {
                        for e in 0..kw {
                            let ih = (i * s.0 + a * d.0) as isize - p.0 .0 as isize;
                            let iw = (j * s.1 + e * d.1) as isize - p.1 .0 as isize;
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                continue;
                            }
                            for ci in 0..cig {
                                let xv = x
                                    [((b * h + ih as usize) * wd + iw as usize) * c + g * cig + ci];
                                let kv = k[((a * kw + e) * cig + ci) * cout + o];
                                acc += xv as f64 * kv as f64;
                            }
                        }
                    }
                    y[((b * oh + i) * ow + j) * cout + o] = acc as f32;
                }
            }
        }
    }
    (y, oh, ow)
}

#[allow(clippy::too_many_arguments)]
fn check_conv2d(
    n: usize,
    h: usize,
    wd: usize,
    c: usize,
    kh: usize,
    kw: usize,
    cout: usize,
    groups: usize,
    s: (usize, usize),
    d: (usize, usize),
    p: ((usize, usize), (usize, usize)),
    threads: usize,
) {
    let mut x = vals(n * h * wd * c, 1);
    let k = vals(kh * kw * (c / groups) * cout, 2);
    let b = vals(cout, 3);
    // Linear; a sigmoid (applied after the kernels, to each task's part); then a ReLU
    // (which the kernels may apply as they store) and a NaN input, which the ReLU
    // turns into 0 wherever it reaches.
    for act in ["linear", "sigmoid", "relu"] {
        let relu = act == "relu";
        if relu {
            let at = x.len() / 3;
            x[at] = f32::NAN;
        }
        let (mut want, oh, ow) =
            naive_conv(&x, n, h, wd, c, &k, kh, kw, cout, groups, s, d, p, Some(&b));
        match act {
            "relu" => want.iter_mut().for_each(|v| *v = v.max(0.0)),
            "sigmoid" => want.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            _ => {}
        }
        let act = format!(r#", "activation": {{"fn": "{act}"}}"#);
        let attrs = format!(
            r#"{{"strides": [{}, {}], "dilations": [{}, {}], "pads": [[{}, {}], [{}, {}]], "groups": {groups}{act}}}"#,
            s.0, s.1, d.0, d.1, p.0 .0, p.0 .1, p.1 .0, p.1 .1
        );
        let json = one_node(
            "conv",
            &[h, wd, c],
            &[oh, ow, cout],
            &attrs,
            r#"{"kernel": "k", "bias": "b"}"#,
        );
        let cont = container(
            &json,
            &[
                w("k", &[kh, kw, c / groups, cout], k.clone()),
                w("b", &[cout], b.clone()),
            ],
        );
        let got = run(&cont, &x, n, threads);
        assert_close(&got, &want, 1e-4);
    }
}

#[test]
fn conv2d_general_matches_naive() {
    check_conv2d(2, 7, 6, 3, 3, 3, 5, 1, (1, 1), (1, 1), ((1, 1), (1, 1)), 1);
    check_conv2d(2, 9, 8, 4, 3, 2, 6, 1, (2, 1), (1, 2), ((0, 2), (1, 0)), 2);
    check_conv2d(3, 8, 8, 6, 3, 3, 4, 2, (2, 2), (1, 1), ((1, 1), (1, 1)), 2); // grouped
    check_conv2d(1, 5, 5, 16, 1, 1, 8, 1, (1, 1), (1, 1), ((0, 0), (0, 0)), 2); // pointwise
    check_conv2d(1, 5, 5, 8, 1, 1, 8, 4, (1, 1), (1, 1), ((0, 0), (0, 0)), 1); // grouped pointwise
    check_conv2d(1, 6, 6, 8, 1, 1, 4, 1, (2, 2), (1, 1), ((0, 0), (0, 0)), 1); // strided 1x1
                                                                               // Many rows (split across threads) and more than one 32-column panel of outputs;
                                                                               // kernels wider than the image, so rows of the im2col matrix are cut on both sides.
    check_conv2d(
        2,
        23,
        19,
        5,
        3,
        3,
        40,
        1,
        (2, 2),
        (1, 1),
        ((1, 1), (2, 1)),
        2,
    );
    check_conv2d(3, 9, 4, 3, 5, 5, 33, 1, (1, 1), (1, 1), ((2, 2), (2, 2)), 2);
    check_conv2d(
        4,
        16,
        16,
        1,
        3,
        3,
        32,
        1,
        (1, 1),
        (1, 1),
        ((1, 1), (1, 1)),
        3,
    );
    check_conv2d(
        2,
        12,
        12,
        7,
        1,
        1,
        70,
        1,
        (1, 1),
        (1, 1),
        ((0, 0), (0, 0)),
        2,
    ); // pointwise
       // Several im2col blocks per task (96-row blocks of 576 columns; 3 tasks of ~170
       // rows), the last block of each task partial.
    check_conv2d(
        2,
        16,
        16,
        64,
        3,
        3,
        40,
        1,
        (1, 1),
        (1, 1),
        ((1, 1), (1, 1)),
        3,
    );
}

/// The direct path (one group, contiguous window runs of ≥ 16 floats, no im2col
/// matrix): strides, row and column dilation, uneven and wider-than-image padding, odd
/// sizes, rows of several micro-kernel runs, output channels off the 32-column panels,
/// one to three threads.
#[test]
fn conv2d_direct_matches_naive() {
    let same = ((1, 1), (1, 1));
    check_conv2d(2, 28, 28, 16, 3, 3, 32, 1, (1, 1), (1, 1), same, 2); // 28 wide: 3 runs
    check_conv2d(1, 7, 7, 64, 3, 3, 64, 1, (1, 1), (1, 1), same, 2); // panels split
    check_conv2d(1, 5, 6, 8, 3, 3, 70, 1, (1, 1), (1, 1), same, 3); // 3 ragged panels
    check_conv2d(3, 6, 7, 24, 3, 3, 100, 1, (1, 1), (1, 1), same, 2); // 2-panel calls: 64 + 36
    check_conv2d(
        3,
        11,
        13,
        20,
        3,
        5,
        45,
        1,
        (2, 3),
        (1, 1),
        ((0, 2), (2, 1)),
        3,
    );
    check_conv2d(
        2,
        10,
        17,
        17,
        3,
        3,
        7,
        1,
        (1, 2),
        (2, 2),
        ((2, 2), (1, 3)),
        2,
    ); // taps of 17
    check_conv2d(1, 9, 9, 8, 2, 2, 33, 1, (1, 1), (3, 1), ((0, 0), (0, 0)), 1);
    check_conv2d(
        5,
        6,
        30,
        16,
        1,
        3,
        12,
        1,
        (1, 1),
        (1, 1),
        ((0, 0), (1, 1)),
        2,
    );
    check_conv2d(1, 3, 3, 16, 5, 5, 8, 1, (1, 1), (1, 1), ((2, 2), (2, 2)), 2);
    check_conv2d(
        4,
        5,
        4,
        24,
        3,
        3,
        70,
        1,
        (2, 2),
        (1, 1),
        ((1, 0), (0, 1)),
        3,
    );
    // Rows wider than a gather block; more window runs (81 taps) than the AVX-512
    // gather kernel takes (the strided calls instead); the 1-channel first layer.
    check_conv2d(1, 3, 140, 16, 3, 3, 20, 1, (1, 1), (1, 1), same, 2);
    let wide = ((4, 4), (8, 8));
    check_conv2d(1, 18, 19, 16, 9, 9, 8, 1, (1, 1), (1, 2), wide, 2);
    check_conv2d(3, 28, 28, 1, 3, 3, 32, 1, (1, 1), (1, 1), same, 2);
}

/// `conv (relu) → max pool` as a two-node program against the naive conv and a naive
/// pool; on the AVX-512 and AVX2 kernels the executor fuses non-overlapping max pools
/// into the conv (checked: the node is gone after `fuse_conv_pools`), elsewhere (the
/// portable family, overlapping windows, average pools) they stay two nodes.
#[allow(clippy::too_many_arguments)]
fn check_conv_pool(
    n: usize,
    h: usize,
    wd: usize,
    c: usize,
    cout: usize,
    s: usize,
    (pk, ps): ((usize, usize), (usize, usize)),
    max: bool,
    threads: usize,
    fuses: bool,
) {
    let x = vals(n * h * wd * c, 4);
    let k = vals(9 * c * cout, 5);
    let b = vals(cout, 6);
    let pads = ((1, 1), (1, 1));
    let (mut co, oh, ow) = naive_conv(
        &x,
        n,
        h,
        wd,
        c,
        &k,
        3,
        3,
        cout,
        1,
        (s, s),
        (1, 1),
        pads,
        Some(&b),
    );
    co.iter_mut().for_each(|v| *v = v.max(0.0));
    let (ph, pw) = ((oh - pk.0) / ps.0 + 1, (ow - pk.1) / ps.1 + 1);
    let mut want = Vec::with_capacity(n * ph * pw * cout);
    for i in 0..n {
        for (py, px) in (0..ph).flat_map(|py| (0..pw).map(move |px| (py, px))) {
            for o in 0..cout {
                let taps = (0..pk.0).flat_map(|a| (0..pk.1).map(move |b| (a, b)));
                let v = taps
                    .map(|(a, b)| co[((i * oh + py * ps.0 + a) * ow + px * ps.1 + b) * cout + o]);
                want.push(if max {
                    v.fold(f32::NEG_INFINITY, f32::max)
                } else {
                    v.sum::<f32>() / (pk.0 * pk.1) as f32
                });
            }
        }
    }
    let json = format!(
        r#"{{"format": "ennclave-program", "version": 1,
      "inputs": [{{"name": "x", "shape": [null, {h}, {wd}, {c}], "dtype": "float32"}}],
      "outputs": [{{"name": "y", "shape": [null, {ph}, {pw}, {cout}], "dtype": "float32"}}],
      "nodes": [
        {{"name": "c", "op": "conv", "inputs": ["x"], "outputs": ["h"], "attrs": {{"strides": [{s}, {s}], "pads": [[1, 1], [1, 1]], "activation": {{"fn": "relu"}}}}, "weights": {{"kernel": "k", "bias": "b"}}}},
        {{"name": "p", "op": "pool", "inputs": ["h"], "outputs": ["y"], "attrs": {{"kind": "{}", "window": [{}, {}], "strides": [{}, {}], "pads": [[0, 0], [0, 0]]}}}}
      ]}}"#,
        if max { "max" } else { "avg" },
        pk.0,
        pk.1,
        ps.0,
        ps.1
    );
    let cont = container(&json, &[w("k", &[3, 3, c, cout], k), w("b", &[cout], b)]);
    let p = Program::from_container(&cont).unwrap();
    let mut nodes = p.nodes.clone();
    fuse_conv_pools(&mut nodes, p.output);
    let direct = matches!(dense::isa(), dense::Isa::Avx512 | dense::Isa::Avx2);
    assert_eq!(nodes.len(), if fuses && direct { 1 } else { 2 });
    let got = run(&cont, &x, n, threads);
    assert_close(&got, &want, 1e-4);
}

#[test]
fn conv_then_max_pool_matches_naive() {
    // The image model's layers: 1 channel (im2col runs), then 32 and 64 channels.
    check_conv_pool(3, 28, 28, 1, 32, 1, ((2, 2), (2, 2)), true, 2, true);
    check_conv_pool(2, 14, 14, 32, 64, 1, ((2, 2), (2, 2)), true, 2, true);
    // Batch 1: tasks split the panels (see `direct_split`), also 3 ragged ones.
    check_conv_pool(1, 14, 14, 32, 64, 1, ((2, 2), (2, 2)), true, 2, true);
    check_conv_pool(1, 10, 9, 8, 70, 1, ((2, 2), (2, 2)), true, 3, true);
    check_conv_pool(1, 9, 9, 8, 40, 1, ((3, 3), (3, 3)), true, 2, true);
    // Batches of at least two samples per task: the tasks claim runs of samples as
    // they go (9 samples in 8 runs on 2 threads, 10 in 10 on 3).
    check_conv_pool(9, 14, 14, 32, 64, 1, ((2, 2), (2, 2)), true, 2, true);
    check_conv2d(
        10,
        7,
        7,
        64,
        3,
        3,
        64,
        1,
        (1, 1),
        (1, 1),
        ((1, 1), (1, 1)),
        3,
    );
    // Odd sizes: the last conv row and column are not pooled; 3×2 windows; a strided
    // conv; output channels off the 32-column panels; one and three threads.
    check_conv_pool(1, 7, 9, 20, 40, 1, ((2, 2), (2, 2)), true, 1, true);
    check_conv_pool(2, 9, 8, 3, 7, 1, ((3, 2), (3, 2)), true, 3, true);
    check_conv_pool(2, 11, 10, 16, 33, 2, ((2, 2), (2, 2)), true, 2, true);
    // A double panel and a single one (AVX-512), 13 pixels per pooled row pair.
    check_conv_pool(4, 13, 13, 16, 96, 1, ((2, 2), (2, 2)), true, 2, true);
    // Not fused: overlapping windows, an average pool.
    check_conv_pool(2, 9, 9, 16, 8, 1, ((3, 3), (2, 2)), true, 2, false);
    check_conv_pool(2, 8, 8, 16, 8, 1, ((2, 2), (2, 2)), false, 2, false);
}

#[test]
fn conv2d_depthwise_matches_naive() {
    check_conv2d(2, 7, 7, 8, 3, 3, 8, 8, (1, 1), (1, 1), ((1, 1), (1, 1)), 2);
    check_conv2d(2, 9, 7, 4, 3, 3, 8, 4, (2, 2), (2, 1), ((2, 1), (0, 2)), 2); // multiplier 2
    check_conv2d(1, 5, 5, 3, 5, 5, 3, 3, (1, 1), (1, 1), ((2, 2), (2, 2)), 1);
}

#[test]
fn conv1d_matches_naive() {
    let (n, wd, c, kw, cout) = (2, 11, 3, 3, 4);
    let x = vals(n * wd * c, 5);
    let k = vals(kw * c * cout, 6);
    let (want, _, ow) = naive_conv(
        &x,
        n,
        1,
        wd,
        c,
        &k,
        1,
        kw,
        cout,
        1,
        (1, 2),
        (1, 2),
        ((0, 0), (1, 1)),
        None,
    );
    let json = one_node(
        "conv",
        &[wd, c],
        &[ow, cout],
        r#"{"strides": [2], "dilations": [2], "pads": [[1, 1]], "activation": {"fn": "relu"}}"#,
        r#"{"kernel": "k"}"#,
    );
    let got = run(&container(&json, &[w("k", &[kw, c, cout], k)]), &x, n, 2);
    let want: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
    assert_close(&got, &want, 1e-4);
}

#[test]
fn conv_large_im2col_chunks() {
    // enough rows × K to need several im2col chunks
    check_conv2d(
        4,
        40,
        40,
        32,
        3,
        3,
        16,
        1,
        (1, 1),
        (1, 1),
        ((1, 1), (1, 1)),
        2,
    );
}

#[test]
fn dense_head_matches_naive() {
    let (n, k, h, o) = (3, 40, 64, 7);
    let k1 = vals(k * h, 1);
    let b1 = vals(h, 2);
    let k2 = vals(h * o, 3);
    let json = r#"{"format": "ennclave-program", "version": 1,
      "inputs": [{"name": "x", "shape": [null, 40], "dtype": "float32"}],
      "outputs": [{"name": "p", "shape": [null, 7], "dtype": "float32"}],
      "nodes": [
        {"name": "fc1", "op": "dense", "inputs": ["x"], "outputs": ["h"], "attrs": {"activation": {"fn": "relu"}}, "weights": {"kernel": "k1", "bias": "b1"}},
        {"name": "fc2", "op": "dense", "inputs": ["h"], "outputs": ["p"], "attrs": {"activation": {"fn": "softmax"}}, "weights": {"kernel": "k2"}}
      ]}"#;
    let cont = container(
        json,
        &[
            w("k1", &[k, h], k1.clone()),
            w("b1", &[h], b1.clone()),
            w("k2", &[h, o], k2.clone()),
        ],
    );
    let x = vals(n * k, 9);
    for batch in [1, 3] {
        let got = run(&cont, &x[..batch * k], batch, 2);
        for r in 0..batch {
            let hid: Vec<f64> = (0..h)
                .map(|j| {
                    (b1[j] as f64
                        + (0..k)
                            .map(|i| x[r * k + i] as f64 * k1[i * h + j] as f64)
                            .sum::<f64>())
                    .max(0.0)
                })
                .collect();
            let lo: Vec<f64> = (0..o)
                .map(|j| (0..h).map(|i| hid[i] * k2[i * o + j] as f64).sum())
                .collect();
            let m = lo.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = lo.iter().map(|v| (v - m).exp()).sum();
            let want: Vec<f32> = lo.iter().map(|v| ((v - m).exp() / s) as f32).collect();
            assert_close(&got[r * o..(r + 1) * o], &want, 1e-5);
        }
    }
}

#[test]
fn dense_on_3d_input() {
    // [N, 2, 3] · [3, 2]
    let json = one_node("dense", &[2, 3], &[2, 2], "{}", r#"{"kernel": "k"}"#);
    let cont = container(
        &json,
        &[w("k", &[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0])],
    );
    let got = run(&cont, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1, 1);
    assert_eq!(got, [4.0, 5.0, 10.0, 11.0]);
}

#[test]
fn pools() {
    // 1 × 3 × 3 × 1 input 1..9, 2x2 window stride 1 pad end 1
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let attrs = |kind: &str, cip: bool| {
        format!(
            r#"{{"kind": "{kind}", "window": [2, 2], "strides": [1, 1], "pads": [[0, 1], [0, 1]], "count_include_pad": {cip}}}"#
        )
    };
    let mx = container(
        &one_node("pool", &[3, 3, 1], &[3, 3, 1], &attrs("max", false), "{}"),
        &[],
    );
    assert_eq!(
        run(&mx, &x, 1, 1),
        [5.0, 6.0, 6.0, 8.0, 9.0, 9.0, 8.0, 9.0, 9.0]
    );
    let av = container(
        &one_node("pool", &[3, 3, 1], &[3, 3, 1], &attrs("avg", false), "{}"),
        &[],
    );
    assert_eq!(
        run(&av, &x, 1, 1),
        [3.0, 4.0, 4.5, 6.0, 7.0, 7.5, 7.5, 8.5, 9.0]
    );
    let avp = container(
        &one_node("pool", &[3, 3, 1], &[3, 3, 1], &attrs("avg", true), "{}"),
        &[],
    );
    assert_eq!(
        run(&avp, &x, 1, 1),
        [3.0, 4.0, 2.25, 6.0, 7.0, 3.75, 3.75, 4.25, 2.25]
    );
    // 1-D max pool stride 2
    let p1 = container(
        &one_node(
            "pool",
            &[5, 2],
            &[2, 2],
            r#"{"kind": "max", "window": [2], "strides": [2], "pads": [[0, 0]]}"#,
            "{}",
        ),
        &[],
    );
    assert_eq!(
        run(
            &p1,
            &[1.0, -1.0, 3.0, -3.0, 2.0, 0.0, 0.0, 5.0, 9.0, 9.0],
            1,
            1
        ),
        [3.0, -1.0, 2.0, 5.0]
    );
    // global pools
    let g = container(
        &one_node("global_pool", &[2, 2, 2], &[2], r#"{"kind": "avg"}"#, "{}"),
        &[],
    );
    assert_eq!(
        run(&g, &[1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0], 1, 1),
        [2.5, 25.0]
    );
    let g = container(
        &one_node(
            "global_pool",
            &[2, 2, 2],
            &[1, 1, 2],
            r#"{"kind": "max", "keepdims": true}"#,
            "{}",
        ),
        &[],
    );
    assert_eq!(
        run(&g, &[1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0], 1, 1),
        [4.0, 40.0]
    );
}

#[test]
fn layout_ops() {
    let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
    let t = container(
        &one_node(
            "transpose",
            &[2, 3],
            &[3, 2],
            r#"{"perm": [0, 2, 1]}"#,
            "{}",
        ),
        &[],
    );
    assert_eq!(run(&t, &x, 1, 1), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    let r = container(
        &one_node("reshape", &[2, 3], &[3, 2], r#"{"shape": [-1, 2]}"#, "{}"),
        &[],
    );
    assert_eq!(run(&r, &x, 1, 1), x);
    let p = container(
        &one_node(
            "pad",
            &[2, 3],
            &[3, 4],
            r#"{"pads": [[1, 0], [0, 1]], "value": 9}"#,
            "{}",
        ),
        &[],
    );
    assert_eq!(
        run(&p, &x, 1, 1),
        [9.0, 9.0, 9.0, 9.0, 0.0, 1.0, 2.0, 9.0, 3.0, 4.0, 5.0, 9.0]
    );
    let rd = container(
        &one_node(
            "reduce",
            &[2, 3],
            &[2, 1],
            r#"{"kind": "sum", "axes": [-1], "keepdims": true}"#,
            "{}",
        ),
        &[],
    );
    assert_eq!(run(&rd, &x, 1, 1), [3.0, 12.0]);
    let ss = container(
        &one_node(
            "scale_shift",
            &[2, 3],
            &[2, 3],
            r#"{"axis": 1}"#,
            r#"{"scale": "s", "shift": "t"}"#,
        ),
        &[w("s", &[2], vec![1.0, 2.0]), w("t", &[2], vec![0.0, 1.0])],
    );
    assert_eq!(run(&ss, &x, 1, 1), [0.0, 1.0, 2.0, 7.0, 9.0, 11.0]);
    let ln = container(
        &one_node(
            "layer_norm",
            &[2, 3],
            &[2, 3],
            r#"{"axes": [-1], "epsilon": 0}"#,
            "{}",
        ),
        &[],
    );
    let s = (2.0f32 / 3.0).sqrt();
    assert_close(
        &run(&ln, &x, 1, 1),
        &[-1.0 / s, 0.0, 1.0 / s, -1.0 / s, 0.0, 1.0 / s],
        1e-5,
    );
    let act = container(
        &one_node(
            "activation",
            &[2, 3],
            &[2, 3],
            r#"{"activation": {"fn": "softmax", "axis": 1}}"#,
            "{}",
        ),
        &[],
    );
    let e = 1.0 / (1.0 + 3f32.exp());
    assert_close(
        &run(&act, &x, 1, 1),
        &[e, e, e, 1.0 - e, 1.0 - e, 1.0 - e],
        1e-5,
    );
}

#[test]
fn elementwise_with_constants_and_concat() {
    // y = concat([x * c + x, max(x, 2)], axis=-1) with c of shape [1, 3] (no batch)
    let json = r#"{"format": "ennclave-program", "version": 1,
      "inputs": [{"name": "x", "shape": [null, 2, 3]}],
      "outputs": [{"name": "y", "shape": [null, 2, 6]}],
      "nodes": [
        {"name": "c", "op": "constant", "inputs": [], "outputs": ["c"], "weights": {"value": "c"}},
        {"name": "two", "op": "constant", "inputs": [], "outputs": ["two"], "weights": {"value": "two"}},
        {"name": "m", "op": "mul", "inputs": ["x", "c"], "outputs": ["xc"]},
        {"name": "a", "op": "add", "inputs": ["xc", "x", "two"], "outputs": ["s"]},
        {"name": "mx", "op": "max", "inputs": ["two", "x"], "outputs": ["mx"]},
        {"name": "p", "op": "pow", "inputs": ["mx", "two"], "outputs": ["sq"]},
        {"name": "cat", "op": "concat", "inputs": ["s", "sq"], "outputs": ["y"], "attrs": {"axis": -1}}
      ]}"#;
    let cont = container(
        json,
        &[
            w("c", &[1, 3], vec![1.0, 2.0, 3.0]),
            w("two", &[], vec![2.0]),
        ],
    );
    let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let got = run(&cont, &x, 2, 1);
    let mut want = Vec::new();
    for r in 0..4 {
        let row = &x[r * 3..r * 3 + 3];
        for (j, &v) in row.iter().enumerate() {
            want.push(v * (j as f32 + 1.0) + v + 2.0);
        }
        for &v in row {
            want.push(v.max(2.0).powi(2));
        }
    }
    assert_eq!(got, want);
}

#[test]
fn buffers_are_reused_and_batches_vary() {
    // a chain of 6 activations over a residual: only a few buffers needed
    let mut nodes = Vec::new();
    let mut prev = "x".to_string();
    for i in 0..6 {
        nodes.push(format!(
            r#"{{"name": "a{i}", "op": "activation", "inputs": ["{prev}"], "outputs": ["t{i}"], "attrs": {{"activation": {{"fn": "tanh"}}}}}}"#
        ));
        prev = format!("t{i}");
    }
    nodes.push(format!(
        r#"{{"name": "res", "op": "add", "inputs": ["{prev}", "x"], "outputs": ["y"]}}"#
    ));
    let json = format!(
        r#"{{"format": "ennclave-program", "version": 1, "inputs": [{{"name": "x", "shape": [null, 4]}}],
        "outputs": [{{"name": "y", "shape": [null, 4]}}], "nodes": [{}]}}"#,
        nodes.join(",")
    );
    let cont = container(&json, &[]);
    let p = ennclave_enclave::program::Program::from_container(&cont).unwrap();
    let mut ex = ennclave_enclave::exec::Executor::new(&p, 5, 2).unwrap();
    for batch in [5, 1, 3] {
        let x = vals(batch * 4, batch as u64);
        let mut y = vec![0.0; batch * 4];
        ex.run(&x, batch, &mut y).unwrap();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| (0..6).fold(v, |a, _| a.tanh()) + v)
            .collect();
        assert_close(&y, &want, 1e-6);
    }
    let mut y = vec![0.0; 24];
    assert!(ex.run(&[0.0; 24], 6, &mut y).is_err());
    assert!(ex.run(&[0.0; 3], 1, &mut y[..4]).is_err());
    assert_eq!(ex.input_shape(), [4]);
    assert_eq!(ex.output_len_per_sample(), 4);
}

#[test]
fn dense_panels_layout_equals_rows_layout() {
    use ennclave_enclave::ops::dense::pack_panels;
    // 70 outputs: two full panels and a zero-padded one; k = 300 spans two k-blocks.
    let (k, n) = (300, 70);
    let kern = vals(k * n, 4);
    let bias = vals(n, 5);
    let rows = one_node(
        "dense",
        &[k],
        &[n],
        r#"{"activation": {"fn": "relu"}}"#,
        r#"{"kernel": "k", "bias": "b"}"#,
    );
    let panels = one_node(
        "dense",
        &[k],
        &[n],
        r#"{"activation": {"fn": "relu"}, "kernel_layout": "panels32", "units": 70}"#,
        r#"{"kernel": "k", "bias": "b"}"#,
    );
    let c_rows = container(
        &rows,
        &[w("k", &[k, n], kern.clone()), w("b", &[n], bias.clone())],
    );
    let c_panels = container(
        &panels,
        &[
            w("k", &[3, k, 32], pack_panels(&kern, k, n)),
            w("b", &[n], bias.clone()),
        ],
    );
    let x = vals(20 * k, 6);
    for batch in [1, 2, 13, 20] {
        let want = run(&c_rows, &x[..batch * k], batch, 2);
        let got = run(&c_panels, &x[..batch * k], batch, 2);
        assert_close(&got, &want, 1e-5);
    }
    // A panels32 kernel of the wrong shape, or without units, is refused clearly.
    let load = |json: &str, shape: &[usize]| {
        let len = shape.iter().product();
        let c = container(
            json,
            &[w("k", shape, vec![0.0; len]), w("b", &[n], bias.clone())],
        );
        ennclave_enclave::program::Program::from_container(&c).map(|_| ())
    };
    assert!(load(&panels, &[3, k, 32]).is_ok());
    let e = load(&panels, &[k, n]).unwrap_err().to_string();
    assert!(e.contains("panels32") && e.contains("[3, 300, 32]"), "{e}");
    let e = load(&panels.replace(", \"units\": 70", ""), &[3, k, 32])
        .unwrap_err()
        .to_string();
    assert!(e.contains("units"), "{e}");
    let e = load(&panels.replace("panels32", "tiles"), &[3, k, 32])
        .unwrap_err()
        .to_string();
    assert!(e.contains("kernel_layout"), "{e}");
}

#[test]
fn large_pools_split_across_threads_match_naive() {
    // 5 × 28 × 28 × 32 → 14 × 14 × 32: 31,360 outputs, enough to split across threads.
    let (b, h, c) = (5usize, 28usize, 32usize);
    let mut x = vals(b * h * h * c, 11);
    x[3 * h * h * c + 7] = f32::NAN; // NaN propagates through max, as in numpy
    for kind in ["max", "avg"] {
        let json = one_node(
            "pool",
            &[h, h, c],
            &[h / 2, h / 2, c],
            &format!(
                r#"{{"kind": "{kind}", "window": [2, 2], "strides": [2, 2], "pads": [[0, 0], [0, 0]]}}"#
            ),
            "{}",
        );
        let cont = container(&json, &[]);
        let mut want = vec![0f32; b * (h / 2) * (h / 2) * c];
        for n in 0..b {
            for oh in 0..h / 2 {
                for ow in 0..h / 2 {
                    for ch in 0..c {
                        let v = |i: usize, j: usize| {
                            x[((n * h + 2 * oh + i) * h + 2 * ow + j) * c + ch]
                        };
                        let vs = [v(0, 0), v(0, 1), v(1, 0), v(1, 1)];
                        want[((n * h / 2 + oh) * h / 2 + ow) * c + ch] = if kind == "max" {
                            if vs.iter().any(|v| v.is_nan()) {
                                f32::NAN
                            } else {
                                vs.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
                            }
                        } else {
                            vs.iter().sum::<f32>() / 4.0
                        };
                    }
                }
            }
        }
        for threads in [1, 3] {
            let got = run(&cont, &x, b, threads);
            assert_eq!(got.iter().filter(|v| v.is_nan()).count(), 1, "{kind}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() < 1e-6,
                    "{kind}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn reshapes_and_linear_activations_share_their_input_buffer() {
    // Identity: the output is the input's own buffer.
    let id = container(
        &one_node(
            "activation",
            &[2, 3],
            &[2, 3],
            r#"{"activation": {"fn": "linear"}}"#,
            "{}",
        ),
        &[],
    );
    let p = ennclave_enclave::program::Program::from_container(&id).unwrap();
    let mut ex = ennclave_enclave::exec::Executor::new(&p, 5, 2).unwrap();
    for batch in [5, 1, 3] {
        let x = vals(batch * 6, batch as u64);
        let mut y = vec![0.0; batch * 6];
        ex.run(&x, batch, &mut y).unwrap();
        assert_eq!(y, x);
    }
    // y = relu(tanh(x)) + reshape(linear(reshape(x))): the aliases r, l and l2 must
    // keep x's buffer alive until the add, although x's last direct reader is tanh;
    // freed earlier, relu's output would overwrite it.
    let json = r#"{"format": "ennclave-program", "version": 1,
      "inputs": [{"name": "x", "shape": [null, 6]}],
      "outputs": [{"name": "y", "shape": [null, 6]}],
      "nodes": [
        {"name": "r", "op": "reshape", "inputs": ["x"], "outputs": ["r"], "attrs": {"shape": [2, 3]}},
        {"name": "l", "op": "activation", "inputs": ["r"], "outputs": ["l"], "attrs": {"activation": {"fn": "linear"}}},
        {"name": "l2", "op": "reshape", "inputs": ["l"], "outputs": ["l2"], "attrs": {"shape": [6]}},
        {"name": "t", "op": "activation", "inputs": ["x"], "outputs": ["t"], "attrs": {"activation": {"fn": "tanh"}}},
        {"name": "u", "op": "activation", "inputs": ["t"], "outputs": ["u"], "attrs": {"activation": {"fn": "relu"}}},
        {"name": "y", "op": "add", "inputs": ["u", "l2"], "outputs": ["y"]}
      ]}"#;
    let p = ennclave_enclave::program::Program::from_container(&container(json, &[])).unwrap();
    let mut ex = ennclave_enclave::exec::Executor::new(&p, 4, 1).unwrap();
    for batch in [4, 2] {
        let x = vals(batch * 6, 7);
        let mut y = vec![0.0; batch * 6];
        ex.run(&x, batch, &mut y).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| v.tanh().max(0.0) + v).collect();
        assert_close(&y, &want, 1e-6);
    }
}

/// Naive channels-last 2-D transposed conv (kernel `[c, kh, kw, cout/groups]`),
/// f64 accumulation: scatter every input into the full output, then crop.
#[allow(clippy::too_many_arguments)]
fn naive_conv_transpose(
    x: &[f32],
    (n, h, wd, c): (usize, usize, usize, usize),
    k: &[f32],
    (kh, kw, cout, groups): (usize, usize, usize, usize),
    s: (usize, usize),
    d: (usize, usize),
    p: ((usize, usize), (usize, usize)),
    extra: (usize, usize),
    bias: &[f32],
) -> (Vec<f32>, usize, usize) {
    let fh = (h - 1) * s.0 + d.0 * (kh - 1) + 1 + extra.0;
    let fw = (wd - 1) * s.1 + d.1 * (kw - 1) + 1 + extra.1;
    let (cig, cog) = (c / groups, cout / groups);
    let mut full = vec![0.0f64; n * fh * fw * cout];
    for b in 0..n {
        for i in 0..h {
            for j in 0..wd {
                for ci in 0..c {
                    let g = ci / cig;
                    let xv = x[((b * h + i) * wd + j) * c + ci] as f64;
                    for a in 0..kh {
                        for e in 0..kw {
                            let (oi, oj) = (i * s.0 + a * d.0, j * s.1 + e * d.1);
                            for co in 0..cog {
                                let kv = k[((ci * kh + a) * kw + e) * cog + co] as f64;
                                full[((b * fh + oi) * fw + oj) * cout + g * cog + co] += xv * kv;
                            }
                        }
                    }
                }
            }
        }
    }
    let oh = fh - p.0 .0 - p.0 .1;
    let ow = fw - p.1 .0 - p.1 .1;
    let mut y = Vec::with_capacity(n * oh * ow * cout);
    for b in 0..n {
        for i in 0..oh {
            for j in 0..ow {
                for o in 0..cout {
                    let v = full[((b * fh + i + p.0 .0) * fw + j + p.1 .0) * cout + o];
                    y.push((v + bias[o] as f64) as f32);
                }
            }
        }
    }
    (y, oh, ow)
}

#[allow(clippy::too_many_arguments)]
fn check_conv_transpose(
    (n, h, wd, c): (usize, usize, usize, usize),
    (kh, kw, cout, groups): (usize, usize, usize, usize),
    s: (usize, usize),
    d: (usize, usize),
    p: ((usize, usize), (usize, usize)),
    extra: (usize, usize),
    threads: usize,
) {
    let x = vals(n * h * wd * c, 7);
    let k = vals(c * kh * kw * (cout / groups), 8);
    let b = vals(cout, 9);
    let (want, oh, ow) = naive_conv_transpose(
        &x,
        (n, h, wd, c),
        &k,
        (kh, kw, cout, groups),
        s,
        d,
        p,
        extra,
        &b,
    );
    let (one_d, ins, outs) = if h == 1 && kh == 1 && s.0 == 1 && p.0 == (0, 0) {
        (true, vec![wd, c], vec![ow, cout])
    } else {
        (false, vec![h, wd, c], vec![oh, ow, cout])
    };
    let attrs = if one_d {
        format!(
            r#"{{"strides": [{}], "dilations": [{}], "pads": [[{}, {}]], "output_padding": [{}], "groups": {groups}}}"#,
            s.1, d.1, p.1 .0, p.1 .1, extra.1
        )
    } else {
        format!(
            r#"{{"strides": [{}, {}], "dilations": [{}, {}], "pads": [[{}, {}], [{}, {}]], "output_padding": [{}, {}], "groups": {groups}}}"#,
            s.0, s.1, d.0, d.1, p.0 .0, p.0 .1, p.1 .0, p.1 .1, extra.0, extra.1
        )
    };
    let json = one_node(
        "conv_transpose",
        &ins,
        &outs,
        &attrs,
        r#"{"kernel": "k", "bias": "b"}"#,
    );
    let kshape: Vec<usize> = if one_d {
        vec![c, kw, cout / groups]
    } else {
        vec![c, kh, kw, cout / groups]
    };
    let cont = container(&json, &[w("k", &kshape, k), w("b", &[cout], b)]);
    let got = run(&cont, &x, n, threads);
    assert_close(&got, &want, 1e-4);
}

#[test]
fn conv_transpose_matches_naive() {
    let none = ((0, 0), (0, 0));
    check_conv_transpose((2, 3, 4, 3), (3, 3, 5, 1), (2, 2), (1, 1), none, (0, 0), 1);
    check_conv_transpose(
        (2, 4, 3, 4),
        (3, 2, 6, 2),
        (2, 1),
        (1, 2),
        ((1, 1), (0, 1)),
        (1, 0),
        2,
    );
    check_conv_transpose(
        (3, 5, 5, 2),
        (4, 4, 3, 1),
        (2, 2),
        (1, 1),
        ((1, 1), (1, 1)),
        (0, 0),
        2,
    );
    check_conv_transpose(
        (1, 3, 3, 4),
        (3, 3, 4, 4),
        (1, 1),
        (2, 2),
        ((2, 2), (2, 2)),
        (0, 0),
        1,
    ); // depthwise
    check_conv_transpose(
        (2, 1, 7, 3),
        (1, 3, 4, 1),
        (1, 3),
        (1, 1),
        ((0, 0), (1, 0)),
        (0, 2),
        2,
    ); // 1-D
}

#[test]
fn conv_transpose_large_batch_chunks() {
    // 10 samples of 32x32x8 -> 64x64x32: the columns of all of them exceed the
    // scratch target, so the batch runs in several chunks.
    check_conv_transpose(
        (10, 32, 32, 8),
        (3, 3, 32, 1),
        (2, 2),
        (1, 1),
        ((1, 0), (1, 0)),
        (1, 1),
        2,
    );
}

#[test]
fn conv_transpose_rejects_bad_geometry() {
    let bad = |attrs: &str, kshape: &[usize]| {
        let json = one_node(
            "conv_transpose",
            &[3, 3, 2],
            &[5, 5, 4],
            attrs,
            r#"{"kernel": "k"}"#,
        );
        let n = kshape.iter().product();
        let cont = container(&json, &[w("k", kshape, vec![0.0; n])]);
        Program::from_container(&cont).unwrap_err().0
    };
    let e = bad(
        r#"{"strides": [1, 1], "pads": [[0, 0], [0, 0]]}"#,
        &[3, 3, 3, 4],
    );
    assert!(e.contains("[Cin, k..., Cout/groups]"), "{e}");
    let e = bad(
        r#"{"strides": [1, 1], "pads": [[3, 2], [0, 0]]}"#,
        &[2, 3, 3, 4],
    );
    assert!(e.contains("crop all"), "{e}");
    let e = bad(
        r#"{"strides": [1, 1], "pads": [[0, 0], [0, 0]], "groups": 3}"#,
        &[2, 3, 3, 4],
    );
    assert!(e.contains("groups"), "{e}");
}

#[test]
fn slice_matches_numpy_semantics() {
    // [3, 4, 2] -> rows 2, 0 (step -2), columns 1..4, channel 1
    let x: Vec<f32> = (0..48).map(|v| v as f32).collect();
    let json = one_node(
        "slice",
        &[3, 4, 2],
        &[2, 3, 1],
        r#"{"starts": [2, 1, 1], "steps": [-2, 1, 1], "sizes": [2, 3, 1]}"#,
        "{}",
    );
    let got = run(&container(&json, &[]), &x, 2, 1);
    let mut want = Vec::new();
    for b in 0..2 {
        for i in [2usize, 0] {
            for j in 1..4 {
                want.push(x[b * 24 + i * 8 + j * 2 + 1]);
            }
        }
    }
    assert_eq!(got, want);
    for (attrs, msg) in [
        (
            r#"{"starts": [3, 0, 0], "sizes": [1, 1, 1]}"#,
            "leaves axis 1",
        ),
        (
            r#"{"starts": [0, 0, 0], "steps": [1, 0, 1], "sizes": [1, 1, 1]}"#,
            "step 0",
        ),
        (
            r#"{"starts": [1, 0, 0], "steps": [-1, 1, 1], "sizes": [3, 1, 1]}"#,
            "leaves axis 1",
        ),
        (r#"{"starts": [0, 0], "sizes": [1, 1]}"#, "3 entries"),
    ] {
        let json = one_node("slice", &[3, 4, 2], &[1, 1, 1], attrs, "{}");
        let e = Program::from_container(&container(&json, &[]))
            .unwrap_err()
            .0;
        assert!(e.contains(msg), "{e}");
    }
}

/// Naive 2-D resize at one output position per axis: (index, index, weight).
fn naive_taps(
    inl: usize,
    outl: usize,
    scale: f64,
    mode: &str,
    nearest: Option<&str>,
) -> Vec<(usize, usize, f64)> {
    (0..outl)
        .map(|o| {
            let o = o as f64;
            let x = match mode {
                "asymmetric" => o / scale,
                "half_pixel" => (o + 0.5) / scale - 0.5,
                "pytorch_half_pixel" if outl > 1 => (o + 0.5) / scale - 0.5,
                "align_corners" if outl > 1 => o * (inl - 1) as f64 / (outl - 1) as f64,
                _ => 0.0,
            };
            let last = (inl - 1) as f64;
            match nearest {
                Some("floor") => {
                    let i = x.floor().clamp(0.0, last) as usize;
                    (i, i, 0.0)
                }
                Some(_) => {
                    let r = if x - x.floor() == 0.5 {
                        x.floor()
                    } else {
                        x.round()
                    };
                    let i = r.clamp(0.0, last) as usize;
                    (i, i, 0.0)
                }
                None => {
                    let x = x.clamp(0.0, last);
                    let i = x.floor() as usize;
                    (i, (i + 1).min(inl - 1), x - i as f64)
                }
            }
        })
        .collect()
}

#[test]
fn resize_matches_naive() {
    let (n, h, wd, c) = (2, 3, 4, 2);
    let x = vals(n * h * wd * c, 11);
    for (mode, nearest, oh, ow) in [
        ("asymmetric", Some("floor"), 6, 8),
        ("asymmetric", Some("round_prefer_floor"), 5, 7),
        ("half_pixel", None, 6, 8),
        ("half_pixel", Some("round_prefer_floor"), 7, 3),
        ("align_corners", None, 5, 7),
        ("pytorch_half_pixel", None, 1, 9),
    ] {
        let (sh, sw) = (oh as f64 / h as f64, ow as f64 / wd as f64);
        let (rt, ct) = (
            naive_taps(h, oh, sh, mode, nearest),
            naive_taps(wd, ow, sw, mode, nearest),
        );
        let mut want = Vec::new();
        for b in 0..n {
            for &(r0, r1, fr) in &rt {
                for &(c0, c1, fc) in &ct {
                    for ch in 0..c {
                        let at = |i: usize, j: usize| x[((b * h + i) * wd + j) * c + ch] as f64;
                        let v = (1.0 - fr) * ((1.0 - fc) * at(r0, c0) + fc * at(r0, c1))
                            + fr * ((1.0 - fc) * at(r1, c0) + fc * at(r1, c1));
                        want.push(v as f32);
                    }
                }
            }
        }
        let attrs = format!(
            r#"{{"mode": "{}", "sizes": [{oh}, {ow}], "coordinate_transformation_mode": "{mode}", "nearest_mode": "{}"}}"#,
            if nearest.is_some() {
                "nearest"
            } else {
                "linear"
            },
            nearest.unwrap_or("floor")
        );
        let json = one_node("resize", &[h, wd, c], &[oh, ow, c], &attrs, "{}");
        let got = run(&container(&json, &[]), &x, n, 2);
        assert_close(&got, &want, 1e-5);
    }
    // 1-D, explicit scales: x2 nearest repeats each position.
    let x1: Vec<f32> = (0..6).map(|v| v as f32).collect();
    let json = one_node(
        "resize",
        &[3, 2],
        &[6, 2],
        r#"{"mode": "nearest", "sizes": [6], "scales": [2.0], "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}"#,
        "{}",
    );
    assert_eq!(
        run(&container(&json, &[]), &x1, 1, 1),
        [0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0, 4.0, 5.0, 4.0, 5.0]
    );
    let json = one_node(
        "resize",
        &[3, 2],
        &[6, 2],
        r#"{"mode": "cubic", "sizes": [6]}"#,
        "{}",
    );
    let e = Program::from_container(&container(&json, &[]))
        .unwrap_err()
        .0;
    assert!(e.contains("unknown resize mode"), "{e}");
}

#[test]
fn erfc_activation_keeps_the_tail() {
    let json = one_node(
        "activation",
        &[3],
        &[3],
        r#"{"activation": {"fn": "erfc"}}"#,
        "{}",
    );
    let got = run(&container(&json, &[]), &[-1.0, 0.5, 6.0], 1, 1);
    assert_close(&got[..2], &[1.842_700_8, 0.479_500_1], 1e-6);
    assert!((got[2] / 2.151_973_7e-17 - 1.0).abs() < 1e-5, "{}", got[2]);
}

#[test]
fn large_layer_norm_splits_between_threads() {
    // 4 samples of 64 rows of 256: large enough for the executor to split the rows
    // between threads (`PAR_MIN_FLOATS`); every row against a float64 reference.
    let (n, rows, inner) = (4usize, 64usize, 256usize);
    let x = vals(n * rows * inner, 11);
    let (g, b) = (vals(inner, 12), vals(inner, 13));
    let ln = container(
        &one_node(
            "layer_norm",
            &[rows, inner],
            &[rows, inner],
            r#"{"axes": [-1], "epsilon": 1e-5}"#,
            r#"{"gamma": "g", "beta": "b"}"#,
        ),
        &[w("g", &[inner], g.clone()), w("b", &[inner], b.clone())],
    );
    let mut want = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks_exact(inner).zip(want.chunks_exact_mut(inner)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / inner as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / inner as f64;
        for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
            *o = ((v as f64 - mean) / (var + 1e-5).sqrt() * g[j] as f64 + b[j] as f64) as f32;
        }
    }
    for threads in [1, 2, 3] {
        assert_close(&run(&ln, &x, n, threads), &want, 1e-4);
    }
}
