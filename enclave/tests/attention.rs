//! `matmul` and `softmax` (with a mask) through program → executor, and their load-time
//! errors.

mod common;
use common::*;
use ennclave_enclave::program::Program;

/// x [null, h, t, d]; q = x, k = transpose(x) as [null, h, d, t]; scores = q · k
/// ([null, h, t, t]); probs = softmax(scores + mask); y = probs · x ([null, h, t, d]).
fn attention_json(h: usize, t: usize, d: usize) -> String {
    format!(
        r#"{{"format": "ennclave-program", "version": 1,
  "inputs": [{{"name": "x", "shape": [null, {h}, {t}, {d}]}}],
  "outputs": [{{"name": "y", "shape": [null, {h}, {t}, {d}]}}],
  "nodes": [
    {{"name": "kt", "op": "transpose", "inputs": ["x"], "outputs": ["k"], "attrs": {{"perm": [0, 1, 3, 2]}}}},
    {{"name": "s", "op": "matmul", "inputs": ["x", "k"], "outputs": ["s"]}},
    {{"name": "st", "op": "matmul", "inputs": ["x", "x"], "outputs": ["s2"], "attrs": {{"transpose_b": true}}}},
    {{"name": "ss", "op": "add", "inputs": ["s", "s2"], "outputs": ["s3"]}},
    {{"name": "m", "op": "constant", "inputs": [], "outputs": ["mask"], "weights": {{"value": "mask"}}}},
    {{"name": "p", "op": "softmax", "inputs": ["s3", "mask"], "outputs": ["p"], "attrs": {{"axis": -1}}}},
    {{"name": "o", "op": "matmul", "inputs": ["p", "x"], "outputs": ["y"]}}
  ]}}"#
    )
}

#[test]
fn masked_attention_matches_naive() {
    // A tiny one, and one whose transpose, add and masked softmax are large enough
    // for the executor to split them between threads (`PAR_MIN_FLOATS`).
    for (n, h, t, d) in [(3usize, 2usize, 3usize, 4usize), (8, 4, 64, 32)] {
        check_attention(n, h, t, d);
    }
}

fn check_attention(n: usize, h: usize, t: usize, d: usize) {
    let x = vals(n * h * t * d, 7);
    let mask: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
        .collect();
    let c = container(
        &attention_json(h, t, d),
        &[w("mask", &[t, t], mask.clone())],
    );
    for threads in [1, 2, 3] {
        let got = run(&c, &x, n, threads);
        let mut want = vec![0.0f32; x.len()];
        for s in 0..n * h {
            let xs = &x[s * t * d..(s + 1) * t * d];
            for i in 0..t {
                let mut sc: Vec<f64> = (0..t)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|e| xs[i * d + e] as f64 * xs[j * d + e] as f64)
                            .sum();
                        2.0 * dot + mask[i * t + j] as f64
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc
                    .iter_mut()
                    .map(|v| {
                        *v = (*v - m).exp();
                        *v
                    })
                    .sum();
                for e in 0..d {
                    let acc: f64 = (0..t).map(|j| sc[j] / z * xs[j * d + e] as f64).sum();
                    want[s * t * d + i * d + e] = acc as f32;
                }
            }
        }
        assert_close(&got, &want, 1e-5);
    }
}

fn load_err(json: &str, ws: &[W]) -> String {
    Program::from_container(&container(json, ws))
        .expect_err("must be rejected")
        .0
}

#[test]
fn matmul_shape_errors_are_clear() {
    let j = |a: &str, b: &str, attrs: &str| {
        format!(
            r#"{{"format": "ennclave-program", "version": 1,
  "inputs": [{{"name": "x", "shape": [null, 2, 3, 4]}}],
  "outputs": [{{"name": "y", "shape": [null, 2, 3, 3]}}],
  "nodes": [
    {{"name": "a", "op": "reshape", "inputs": ["x"], "outputs": ["a"], "attrs": {{"shape": {a}}}}},
    {{"name": "b", "op": "reshape", "inputs": ["x"], "outputs": ["b"], "attrs": {{"shape": {b}}}}},
    {{"name": "mm", "op": "matmul", "inputs": ["a", "b"], "outputs": ["y"], "attrs": {attrs}}}
  ]}}"#
        )
    };
    let e = load_err(&j("[2, 3, 4]", "[2, 3, 4]", "{}"), &[]);
    assert!(e.contains("inner dimensions differ"), "{e}");
    let e = load_err(
        &j("[2, 3, 4]", "[3, 2, 4]", r#"{"transpose_b": true}"#),
        &[],
    );
    assert!(e.contains("differ in their leading axes"), "{e}");
    let e = load_err(&j("[2, 3, 4]", "[6, 4]", "{}"), &[]);
    assert!(e.contains("same rank"), "{e}");
    let e = load_err(&j("[2, 3, 4]", "[2, 3, 4]", r#"{"transpose_b": 1}"#), &[]);
    assert!(e.contains("transpose_b"), "{e}");
    // the right shape loads
    Program::from_container(&container(
        &j("[2, 3, 4]", "[2, 3, 4]", r#"{"transpose_b": true}"#),
        &[],
    ))
    .unwrap();
}

#[test]
fn softmax_mask_may_not_change_the_shape() {
    let json = one_node("softmax", &[2, 3], &[2, 3], r#"{"axis": 0}"#, "{}");
    assert!(load_err(&json, &[]).contains("batch axis"));
    let json = r#"{"format": "ennclave-program", "version": 1,
  "inputs": [{"name": "x", "shape": [null, 1, 3]}],
  "outputs": [{"name": "y", "shape": [null, 1, 3]}],
  "nodes": [
    {"name": "m", "op": "constant", "inputs": [], "outputs": ["mask"], "weights": {"value": "mask"}},
    {"name": "p", "op": "softmax", "inputs": ["x", "mask"], "outputs": ["y"]}
  ]}"#;
    let e = load_err(json, &[w("mask", &[2, 3], vec![0.0; 6])]);
    assert!(e.contains("may not change x's shape"), "{e}");
}

#[test]
fn gather_checks_every_id() {
    let json = r#"{"format": "ennclave-program", "version": 1,
  "inputs": [{"name": "x", "shape": [null, 3], "dtype": "int32"}],
  "outputs": [{"name": "y", "shape": [null, 3, 2]}],
  "nodes": [{"name": "emb", "op": "gather", "inputs": ["x"], "outputs": ["y"], "weights": {"table": "t"}}]}"#;
    let table: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let c = container(json, &[w("t", &[4, 2], table)]);
    let got = run(&c, &[3.0, 0.0, 1.0, 2.0, 2.0, 3.0], 2, 1);
    assert_eq!(got, [6., 7., 0., 1., 2., 3., 4., 5., 4., 5., 6., 7.]);
    let p = Program::from_container(&c).unwrap();
    let mut ex = ennclave_enclave::exec::Executor::new(&p, 2, 1).unwrap();
    let mut out = vec![0.0; 12];
    for bad in [4.0, -1.0, 1.5, f32::NAN] {
        let e = ex
            .run(&[0.0, 1.0, 2.0, 3.0, bad, 0.0], 2, &mut out)
            .expect_err("bad id");
        assert!(
            e.0.contains("(sample 1, position 1) is not an integer in 0..4"),
            "{e}"
        );
    }
    ex.run(&[0.0, 1.0, 2.0, 3.0, 0.0, 0.0], 2, &mut out)
        .unwrap();
    let bad = json.replace("int32", "int8");
    assert!(load_err(&bad, &[w("t", &[4, 2], vec![0.0; 8])]).contains("float32 (or int32/int64)"));
}

/// Several graph inputs: a cut tensor x [null, 2, 3] and a model input mask
/// [null, 3] (1 = keep, 0 = pad, as a padding mask), packed per sample; an unused
/// third input takes a slot but changes nothing. y = softmax(x + (mask − 1)·1e9).
#[test]
fn several_inputs_are_unpacked_per_sample() {
    let json = r#"{"format": "ennclave-program", "version": 1,
  "inputs": [{"name": "x", "shape": [null, 2, 3]},
             {"name": "mask", "shape": [null, 3], "dtype": "int64"},
             {"name": "unused", "shape": [null, 5]}],
  "outputs": [{"name": "y", "shape": [null, 2, 3]}],
  "nodes": [
    {"name": "one", "op": "constant", "inputs": [], "outputs": ["one"], "weights": {"value": "one"}},
    {"name": "big", "op": "constant", "inputs": [], "outputs": ["big"], "weights": {"value": "big"}},
    {"name": "m1", "op": "sub", "inputs": ["mask", "one"], "outputs": ["m1"]},
    {"name": "m2", "op": "mul", "inputs": ["m1", "big"], "outputs": ["m2"]},
    {"name": "m3", "op": "reshape", "inputs": ["m2"], "outputs": ["m3"], "attrs": {"shape": [1, 3]}},
    {"name": "p", "op": "softmax", "inputs": ["x", "m3"], "outputs": ["y"]}
  ]}"#;
    let c = container(
        json,
        &[w("one", &[1], vec![1.0]), w("big", &[1], vec![1e9])],
    );
    let (n, xl) = (3usize, 6usize);
    let x = vals(n * xl, 3);
    let masks = [[1.0f32, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]];
    let mut packed = Vec::new();
    for i in 0..n {
        packed.extend_from_slice(&x[i * xl..(i + 1) * xl]);
        packed.extend_from_slice(&masks[i]);
        packed.extend_from_slice(&[9.0; 5]);
    }
    let p = Program::from_container(&c).unwrap();
    assert_eq!(p.inputs, [0, 1, 2]);
    for threads in [1, 2] {
        let mut ex = ennclave_enclave::exec::Executor::new(&p, 4, threads).unwrap();
        assert_eq!(ex.input_len_per_sample(), 6 + 3 + 5);
        assert_eq!(ex.input_shapes(), [&[2usize, 3][..], &[3], &[5]]);
        let mut got = vec![0.0f32; n * xl];
        ex.run(&packed, n, &mut got).unwrap();
        for i in 0..n {
            for r in 0..2 {
                let row = &x[i * xl + r * 3..i * xl + r * 3 + 3];
                let keep = &masks[i];
                let m = (0..3)
                    .filter(|&j| keep[j] > 0.0)
                    .map(|j| row[j] as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..3)
                    .filter(|&j| keep[j] > 0.0)
                    .map(|j| (row[j] as f64 - m).exp())
                    .sum();
                for j in 0..3 {
                    let want = if keep[j] > 0.0 {
                        (row[j] as f64 - m).exp() / z
                    } else {
                        0.0
                    };
                    let g = got[i * xl + r * 3 + j] as f64;
                    assert!(
                        (g - want).abs() < 1e-6,
                        "sample {i} row {r} col {j}: {g} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn input_declarations_are_checked() {
    let base = r#"{"format": "ennclave-program", "version": 1,
  "inputs": INPUTS,
  "outputs": [{"name": "y", "shape": [null, 3]}],
  "nodes": [{"name": "a", "op": "add", "inputs": ["x", "x"], "outputs": ["y"]}]}"#;
    let e = load_err(&base.replace("INPUTS", "[]"), &[]);
    assert!(e.contains("1 to 16 inputs"), "{e}");
    let twice = r#"[{"name": "x", "shape": [null, 3]}, {"name": "x", "shape": [null, 3]}]"#;
    let e = load_err(&base.replace("INPUTS", twice), &[]);
    assert!(e.contains("graph input \"x\" is declared twice"), "{e}");
    let many = format!(
        "[{}]",
        (0..17)
            .map(|i| format!(r#"{{"name": "x{i}", "shape": [null, 3]}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let e = load_err(&base.replace("INPUTS", &many), &[]);
    assert!(e.contains("1 to 16 inputs"), "{e}");
}
