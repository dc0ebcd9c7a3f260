//! `equal`, `where`, `cast` and `expand` (the attention-mask ops) through program →
//! executor, and their load-time errors.

mod common;
use common::*;
use ennclave_enclave::program::Program;

/// x [null, 2, 3]: m = cast(x · 2 → int32) (truncation), e = equal(m, 0), c = cast(x →
/// bool), y = where(e, expand(x[:, :1] → [2, 3]), -7) + c.
fn mask_json() -> String {
    r#"{"format": "ennclave-program", "version": 1,
  "inputs": [{"name": "x", "shape": [null, 2, 3]}],
  "outputs": [{"name": "y", "shape": [null, 2, 3]}],
  "nodes": [
    {"name": "two", "op": "constant", "inputs": [], "outputs": ["two"], "weights": {"value": "two"}},
    {"name": "zero", "op": "constant", "inputs": [], "outputs": ["zero"], "weights": {"value": "zero"}},
    {"name": "minus7", "op": "constant", "inputs": [], "outputs": ["m7"], "weights": {"value": "m7"}},
    {"name": "x2", "op": "mul", "inputs": ["x", "two"], "outputs": ["x2"]},
    {"name": "mi", "op": "cast", "inputs": ["x2"], "outputs": ["mi"], "attrs": {"to": "int32"}},
    {"name": "eq", "op": "equal", "inputs": ["mi", "zero"], "outputs": ["eq"]},
    {"name": "cb", "op": "cast", "inputs": ["x"], "outputs": ["cb"], "attrs": {"to": "bool"}},
    {"name": "first", "op": "slice", "inputs": ["x"], "outputs": ["first"], "attrs": {"starts": [0, 0], "sizes": [1, 3]}},
    {"name": "ex", "op": "expand", "inputs": ["first"], "outputs": ["ex"], "attrs": {"shape": [2, 3]}},
    {"name": "wh", "op": "where", "inputs": ["eq", "ex", "m7"], "outputs": ["wh"]},
    {"name": "y", "op": "add", "inputs": ["wh", "cb"], "outputs": ["y"]}
  ]}"#
    .to_string()
}

#[test]
fn mask_ops_match_naive() {
    let n = 3;
    let mut x = vals(n * 6, 11);
    x[1] = 0.0; // cast to bool gives 0 there
    x[4] = 0.3; // 0.6 truncates to 0: equal holds
    let ws = [
        w("two", &[], vec![2.0]),
        w("zero", &[], vec![0.0]),
        w("m7", &[], vec![-7.0]),
    ];
    let c = container(&mask_json(), &ws);
    let mut want = vec![0.0f32; x.len()];
    for s in 0..n {
        for i in 0..2 {
            for j in 0..3 {
                let v = x[s * 6 + i * 3 + j];
                let eq = (v * 2.0).trunc() == 0.0;
                let picked = if eq { x[s * 6 + j] } else { -7.0 };
                want[s * 6 + i * 3 + j] = picked + if v != 0.0 { 1.0 } else { 0.0 };
            }
        }
    }
    for threads in [1, 2] {
        assert_close(&run(&c, &x, n, threads), &want, 1e-6);
    }
}

#[test]
fn mask_op_errors_are_clear() {
    let prog = |node: &str, out: &str| {
        format!(
            r#"{{"format": "ennclave-program", "version": 1,
  "inputs": [{{"name": "x", "shape": [null, 2, 3]}}],
  "outputs": [{{"name": "y", "shape": [null, {out}]}}],
  "nodes": [{node}]}}"#
        )
    };
    let err = |json: String| {
        Program::from_container(&container(&json, &[]))
            .expect_err("must be rejected")
            .0
    };
    let e = err(prog(
        r#"{"name": "e", "op": "expand", "inputs": ["x"], "outputs": ["y"], "attrs": {"shape": [4, 3]}}"#,
        "4, 3",
    ));
    assert!(e.contains("does not broadcast"), "{e}");
    let e = err(prog(
        r#"{"name": "c", "op": "cast", "inputs": ["x"], "outputs": ["y"], "attrs": {"to": "float16"}}"#,
        "2, 3",
    ));
    assert!(e.contains("only float32, bool, int32 and int64"), "{e}");
    let e = err(prog(
        r#"{"name": "w", "op": "where", "inputs": ["x", "x"], "outputs": ["y"]}"#,
        "2, 3",
    ));
    assert!(e.contains("exactly 3 inputs"), "{e}");
}
