//! Helpers shared by the integration tests: build program containers in memory.
#![allow(dead_code)]

use ennclave_enclave::exec::Executor;
use ennclave_enclave::program::Program;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

pub struct W {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn w(name: &'static str, shape: &[usize], data: Vec<f32>) -> W {
    assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
    W {
        name,
        shape: shape.to_vec(),
        data,
    }
}

pub fn safetensors_bytes(ws: &[W]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = ws
        .iter()
        .map(|w| w.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView)> = ws
        .iter()
        .zip(&bytes)
        .map(|(w, b)| {
            (
                w.name,
                TensorView::new(Dtype::F32, w.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

pub fn container(json: &str, ws: &[W]) -> Vec<u8> {
    let mut c = b"ENCPROG1".to_vec();
    c.extend_from_slice(&(json.len() as u64).to_le_bytes());
    c.extend_from_slice(json.as_bytes());
    c.extend_from_slice(&safetensors_bytes(ws));
    c
}

/// A one-node program `x[null, in_shape] -> y[null, out_shape]`.
pub fn one_node(
    op: &str,
    in_shape: &[usize],
    out_shape: &[usize],
    attrs: &str,
    weights: &str,
) -> String {
    let s = |d: &[usize]| d.iter().map(|v| format!(", {v}")).collect::<String>();
    format!(
        r#"{{"format": "ennclave-program", "version": 1,
  "inputs": [{{"name": "x", "shape": [null{}], "dtype": "float32"}}],
  "outputs": [{{"name": "y", "shape": [null{}], "dtype": "float32"}}],
  "nodes": [{{"name": "n", "op": "{op}", "inputs": ["x"], "outputs": ["y"], "attrs": {attrs}, "weights": {weights}}}]}}"#,
        s(in_shape),
        s(out_shape)
    )
}

pub fn run(container: &[u8], input: &[f32], batch: usize, threads: usize) -> Vec<f32> {
    let p = Program::from_container(container).unwrap_or_else(|e| panic!("{e}"));
    let mut ex = Executor::new(&p, batch.max(1), threads).unwrap();
    let mut out = vec![f32::NAN; ex.output_len_per_sample() * batch];
    ex.run(input, batch, &mut out).unwrap();
    out
}

/// Deterministic pseudo-random values in [-1, 1].
pub fn vals(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(12345);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "element {i}: got {a}, want {b}"
        );
    }
}
