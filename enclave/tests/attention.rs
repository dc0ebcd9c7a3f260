//! `matmul` and `softmax` (with a mask) through program → executor, and their load-time
//! errors.

mod common;
use common::*;
use ennclave_enclave::program::Program;

/// x [null, 2, 3, 4]; q = x, k = transpose(x) as [null, 2, 4, 3]; scores = q · k
/// ([null, 2, 3, 3]); probs = softmax(scores + mask); y = probs · x ([null, 2, 3, 4]).
fn attention_json() -> String {
    r#"{"format": "ennclave-program", "version": 1,
  "inputs": [{"name": "x", "shape": [null, 2, 3, 4]}],
  "outputs": [{"name": "y", "shape": [null, 2, 3, 4]}],
  "nodes": [
    {"name": "kt", "op": "transpose", "inputs": ["x"], "outputs": ["k"], "attrs": {"perm": [0, 1, 3, 2]}},
    {"name": "s", "op": "matmul", "inputs": ["x", "k"], "outputs": ["s"]},
    {"name": "st", "op": "matmul", "inputs": ["x", "x"], "outputs": ["s2"], "attrs": {"transpose_b": true}},
    {"name": "ss", "op": "add", "inputs": ["s", "s2"], "outputs": ["s3"]},
    {"name": "m", "op": "constant", "inputs": [], "outputs": ["mask"], "weights": {"value": "mask"}},
    {"name": "p", "op": "softmax", "inputs": ["s3", "mask"], "outputs": ["p"], "attrs": {"axis": -1}},
    {"name": "o", "op": "matmul", "inputs": ["p", "x"], "outputs": ["y"]}
  ]}"#
    .to_string()
}

#[test]
fn masked_attention_matches_naive() {
    let (n, h, t, d) = (3usize, 2usize, 3usize, 4usize);
    let x = vals(n * h * t * d, 7);
    let mask: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
        .collect();
    let c = container(&attention_json(), &[w("mask", &[t, t], mask.clone())]);
    for threads in [1, 2] {
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
