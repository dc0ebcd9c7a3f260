//! Load-time validation: clear errors for bad programs, and no panics on any bytes.

mod common;
use common::*;
use ennclave_enclave::exec::Executor;
use ennclave_enclave::program::Program;
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn load_err(c: &[u8]) -> String {
    match Program::from_container(c) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn dense_json(kernel_key: &str, out: usize, op: &str) -> String {
    format!(
        r#"{{"format": "ennclave-program", "version": 1,
  "inputs": [{{"name": "x", "shape": [null, 4], "dtype": "float32"}}],
  "outputs": [{{"name": "y", "shape": [null, {out}], "dtype": "float32"}}],
  "nodes": [{{"name": "fc", "op": "{op}", "inputs": ["x"], "outputs": ["y"],
     "attrs": {{"activation": {{"fn": "relu"}}}}, "weights": {{"kernel": "{kernel_key}", "bias": "b"}}}}]}}"#
    )
}

fn good_weights() -> Vec<W> {
    vec![w("k", &[4, 3], vals(12, 1)), w("b", &[3], vals(3, 2))]
}

fn good() -> Vec<u8> {
    container(&dense_json("k", 3, "dense"), &good_weights())
}

#[test]
fn good_program_loads() {
    let p = Program::from_container(&good()).unwrap();
    let ex = Executor::new(&p, 4, 1).unwrap();
    assert_eq!(
        (ex.input_shape(), ex.output_shape()),
        (&[4usize][..], &[3usize][..])
    );
    let _ = p.weights_backing().as_str();
    // The weights are used in place in the (secret) container, not copied.
    assert!(p.weights_in_place());
}

#[test]
fn errors_are_clear() {
    assert!(load_err(b"NOTPROG1\0\0\0\0\0\0\0\0").contains("magic"));
    let mut c = good();
    c[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(load_err(&c).contains("truncated"));
    assert!(load_err(&container("{", &[])).contains("JSON"));
    let e = load_err(&container(
        &dense_json("k", 3, "dense").replace("\"version\": 1", "\"version\": 2"),
        &good_weights(),
    ));
    assert!(e.contains("version"), "{e}");
    let e = load_err(&container(&dense_json("k", 3, "densest"), &good_weights()));
    assert!(e.contains("unknown op") && e.contains("fc"), "{e}");
    let e = load_err(&container(&dense_json("nope", 3, "dense"), &good_weights()));
    assert!(e.contains("nope") && e.contains("fc"), "{e}");
    let e = load_err(&container(
        &dense_json("k", 3, "dense"),
        &[w("k", &[5, 3], vals(15, 1)), w("b", &[3], vals(3, 2))],
    ));
    assert!(e.contains("kernel"), "{e}");
    let e = load_err(&container(
        &dense_json("k", 3, "dense"),
        &[w("k", &[4, 3], vals(12, 1)), w("b", &[4], vals(4, 2))],
    ));
    assert!(e.contains("bias"), "{e}");
    let e = load_err(&container(&dense_json("k", 5, "dense"), &good_weights()));
    assert!(e.contains("declared"), "{e}");
    let e = load_err(&container(
        &dense_json("k", 3, "dense").replace("[\"x\"]", "[\"z\"]"),
        &good_weights(),
    ));
    assert!(e.contains("not defined"), "{e}");
    let e = load_err(&container(
        &dense_json("k", 3, "dense").replace("relu", "relu7"),
        &good_weights(),
    ));
    assert!(e.contains("relu7"), "{e}");
    let e = load_err(&container(
        &one_node(
            "conv",
            &[4, 4, 2],
            &[4, 4, 2],
            r#"{"pads": [[1, 1], [1, 1]]}"#,
            r#"{"kernel": "k"}"#,
        ),
        &[w("k", &[3, 3, 2, 2], vals(36, 1))],
    ));
    assert!(e.contains("strides"), "{e}");
    let e = load_err(&container(
        &one_node(
            "pool",
            &[2, 2, 1],
            &[1, 1, 1],
            r#"{"kind": "max", "window": [5, 5], "strides": [1, 1], "pads": [[0, 0], [0, 0]]}"#,
            "{}",
        ),
        &[],
    ));
    assert!(e.contains("larger"), "{e}");
    let e = load_err(&container(
        &one_node(
            "transpose",
            &[2, 3],
            &[3, 2],
            r#"{"perm": [1, 0, 2]}"#,
            "{}",
        ),
        &[],
    ));
    assert!(e.contains("batch"), "{e}");
    let e = load_err(&container(
        &one_node("reshape", &[2, 3], &[4, 2], r#"{"shape": [4, -1]}"#, "{}"),
        &[],
    ));
    assert!(e.contains("reshape"), "{e}");
}

#[test]
fn huge_shapes_are_rejected_not_allocated() {
    let json = one_node(
        "pad",
        &[4],
        &[4],
        r#"{"pads": [[16000000, 16000000]]}"#,
        "{}",
    );
    assert!(Program::from_container(&container(&json, &[])).is_err());
    let json = r#"{"format": "ennclave-program", "version": 1,
      "inputs": [{"name": "x", "shape": [null, 65536, 65536]}], "outputs": [{"name": "x", "shape": [null, 1]}], "nodes": []}"#;
    assert!(Program::from_container(&container(json, &[])).is_err());
}

fn mutate(mut data: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(i, v) in edits {
        if !data.is_empty() {
            let n = data.len();
            data[i % n] = v;
        }
    }
    if let Some(c) = cut {
        let n = data.len();
        data.truncate(c % (n + 1));
    }
    data
}

fn conv_container() -> Vec<u8> {
    let json = one_node(
        "conv",
        &[5, 5, 2],
        &[3, 3, 4],
        r#"{"strides": [2, 2], "dilations": [1, 1], "pads": [[1, 1], [1, 1]], "groups": 2, "activation": {"fn": "softmax", "axis": -1}}"#,
        r#"{"kernel": "k", "bias": "b"}"#,
    );
    container(
        &json,
        &[w("k", &[3, 3, 1, 4], vals(36, 1)), w("b", &[4], vals(4, 2))],
    )
}

/// The newer ops (transposed conv, resize, slice), as fuzzing bases.
fn new_op_container(which: usize) -> Vec<u8> {
    match which {
        0 => container(
            &one_node(
                "conv_transpose",
                &[3, 3, 2],
                &[6, 8, 4],
                r#"{"strides": [2, 2], "dilations": [1, 1], "pads": [[1, 0], [0, 0]], "output_padding": [0, 1], "groups": 2, "activation": {"fn": "erfc"}}"#,
                r#"{"kernel": "k", "bias": "b"}"#,
            ),
            &[w("k", &[2, 3, 3, 2], vals(36, 1)), w("b", &[4], vals(4, 2))],
        ),
        1 => container(
            &one_node(
                "resize",
                &[3, 4, 2],
                &[5, 9, 2],
                r#"{"mode": "linear", "sizes": [5, 9], "scales": [1.5, 2.25], "coordinate_transformation_mode": "align_corners", "nearest_mode": "ceil"}"#,
                "{}",
            ),
            &[],
        ),
        _ => container(
            &one_node(
                "slice",
                &[4, 5, 2],
                &[2, 3, 1],
                r#"{"starts": [3, 0, 1], "steps": [-2, 2, 1], "sizes": [2, 3, 1]}"#,
                "{}",
            ),
            &[],
        ),
    }
}

#[test]
fn new_op_fuzz_bases_load_and_run() {
    for k in 0..3 {
        let p = Program::from_container(&new_op_container(k)).unwrap_or_else(|e| panic!("{e}"));
        let mut ex = Executor::new(&p, 2, 1).unwrap();
        let x = vec![0.5f32; ex.input_len_per_sample() * 2];
        let mut y = vec![0.0f32; ex.output_len_per_sample() * 2];
        ex.run(&x, 2, &mut y).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Program::from_container(&data);
        let mut c = b"ENCPROG1".to_vec();
        c.extend_from_slice(&(data.len().min(64) as u64).to_le_bytes());
        c.extend_from_slice(&data);
        let _ = Program::from_container(&c);
    }

    #[test]
    fn mutated_containers_never_panic(
        which in 0..5usize,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let base = match which {
            0 => good(),
            1 => conv_container(),
            k => new_op_container(k - 2),
        };
        let c = mutate(base, &edits, cut);
        if let Ok(p) = Program::from_container(&c) {
            // Whatever loads must also plan and run.
            if let Ok(mut ex) = Executor::new(&p, 2, 1) {
                let x = vec![0.5f32; ex.input_len_per_sample() * 2];
                let mut y = vec![0.0f32; ex.output_len_per_sample() * 2];
                prop_assert!(ex.run(&x, 2, &mut y).is_ok());
            }
        }
    }

    #[test]
    fn mutated_json_never_panics(
        pos in any::<usize>(),
        token in prop::sample::select(vec![
            "null", "-1", "0", "1", "99999999999", "1e300", "\"x\"", "[]", "{}", "[[0, 0]]",
            "-3", "true", "[null, 0]", "\"y\"", "\"conv\"", "\"pool\"", "\"softmax\"",
            "\"linear\"", "\"nearest\"", "[-1, 1, 1]", "[0, 0, 0]", "1e-30", "[16777216, 1]",
        ]),
    ) {
        // Replace a JSON value-ish span with a token, keep the weights valid.
        let json = dense_json("k", 3, "dense");
        let p = pos % json.len();
        // The newer ops' attributes too (their containers carry their weights).
        for k in 0..3 {
            let c = new_op_container(k);
            let n = u64::from_le_bytes(c[8..16].try_into().unwrap()) as usize;
            let (j, rest) = (std::str::from_utf8(&c[16..16 + n]).unwrap(), &c[16 + n..]);
            let p = pos % j.len();
            let q = j[p..].find([',', '}', ']']).map_or(j.len(), |i| p + i);
            if j.is_char_boundary(p) && j.is_char_boundary(q) {
                let m = format!("{}{}{}", &j[..p], token, &j[q..]);
                let mut c2 = b"ENCPROG1".to_vec();
                c2.extend_from_slice(&(m.len() as u64).to_le_bytes());
                c2.extend_from_slice(m.as_bytes());
                c2.extend_from_slice(rest);
                if let Ok(prog) = Program::from_container(&c2) {
                    if let Ok(mut ex) = Executor::new(&prog, 2, 1) {
                        let x = vec![0.5f32; ex.input_len_per_sample() * 2];
                        let mut y = vec![0.0f32; ex.output_len_per_sample() * 2];
                        prop_assert!(ex.run(&x, 2, &mut y).is_ok());
                    }
                }
            }
        }
        let q = json[p..].find([',', '}', ']']).map_or(json.len(), |i| p + i);
        if json.is_char_boundary(p) && json.is_char_boundary(q) {
            let mutated = format!("{}{}{}", &json[..p], token, &json[q..]);
            let _ = Program::from_container(&container(&mutated, &good_weights()));
        }
    }
}

/// An int8 dense node (`panels32x4`, 4 → 3) whose kernel bytes are `q` (32 × 4 of the
/// one panel's row quad: column j's 4 inputs at 4j..4j+4), scales 1, no bias.
fn int8_container(q: &[i8; 128]) -> Vec<u8> {
    let json = r#"{"format": "ennclave-program", "version": 1,
  "inputs": [{"name": "x", "shape": [null, 4], "dtype": "float32"}],
  "outputs": [{"name": "y", "shape": [null, 3], "dtype": "float32"}],
  "nodes": [{"name": "fc", "op": "dense", "inputs": ["x"], "outputs": ["y"],
     "attrs": {"kernel_layout": "panels32x4", "kernel_shape": [4, 3], "units": 3},
     "weights": {"kernel": "k", "kernel_scale": "s"}}]}"#;
    let kb: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    let sb: Vec<u8> = [1.0f32; 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "k",
            TensorView::new(Dtype::I8, vec![1, 1, 32, 4], &kb).unwrap(),
        ),
        ("s", TensorView::new(Dtype::F32, vec![3], &sb).unwrap()),
    ];
    let mut c = b"ENCPROG1".to_vec();
    c.extend_from_slice(&(json.len() as u64).to_le_bytes());
    c.extend_from_slice(json.as_bytes());
    c.extend_from_slice(&safetensors::serialize(views, None).unwrap());
    c
}

#[test]
fn int8_kernels_must_lie_in_127() {
    // Column 0 sums its inputs with weights 127, −127, 1, 0: an input row at the
    // row scale of 1 (max |x| = 127) gives the exact integer sum.
    let mut q = [0i8; 128];
    q[..4].copy_from_slice(&[127, -127, 1, 0]);
    let y = run(&int8_container(&q), &[127.0, -127.0, 5.0, 9.0], 1, 1);
    assert_eq!(y, [127.0 * 127.0 * 2.0 + 5.0, 0.0, 0.0]);
    // −128 is refused at load (the AVX2 kernel cannot negate it), with what to do.
    q[1] = -128;
    let e = load_err(&int8_container(&q));
    assert!(e.contains("-128") && e.contains("-127..127"), "{e}");
}
