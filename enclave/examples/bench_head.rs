//! Dev-only benchmark: dense 512→2048(relu)→2048(relu)→67(softmax), batch 1 and 64.
//! `cargo run --release --example bench_head -- [THREADS] [WEIGHTS_DIR]`: with a
//! directory holding k1,b1,k2,b2,k3,b3 as raw little-endian f32 `.bin` files (from
//! the onnxruntime comparison script) those weights are used, else random ones.

use std::time::Instant;

use ennclave_enclave::exec::Executor;
use ennclave_enclave::program::Program;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let dims = [(512usize, 2048usize), (2048, 2048), (2048, 67)];
    let mut ws: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut seed = 1u64;
    for (i, &(a, b)) in dims.iter().enumerate() {
        for (role, shape) in [("k", vec![a, b]), ("b", vec![b])] {
            let name = format!("{role}{}", i + 1);
            let len: usize = shape.iter().product();
            let bytes = match args.get(2) {
                Some(dir) => std::fs::read(format!("{dir}/{name}.bin")).expect("weights file"),
                None => (0..len)
                    .flat_map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05).to_le_bytes()
                    })
                    .collect(),
            };
            assert_eq!(bytes.len(), len * 4);
            ws.push((name, shape, bytes));
        }
    }
    let views: Vec<(&str, TensorView)> = ws
        .iter()
        .map(|(n, s, b)| {
            (
                n.as_str(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let st = safetensors::serialize(views, None).unwrap();
    let json = r#"{"format": "ennclave-program", "version": 1,
      "inputs": [{"name": "x", "shape": [null, 512], "dtype": "float32"}],
      "outputs": [{"name": "p", "shape": [null, 67], "dtype": "float32"}],
      "nodes": [
        {"name": "fc1", "op": "dense", "inputs": ["x"], "outputs": ["h1"], "attrs": {"activation": {"fn": "relu"}}, "weights": {"kernel": "k1", "bias": "b1"}},
        {"name": "fc2", "op": "dense", "inputs": ["h1"], "outputs": ["h2"], "attrs": {"activation": {"fn": "relu"}}, "weights": {"kernel": "k2", "bias": "b2"}},
        {"name": "fc3", "op": "dense", "inputs": ["h2"], "outputs": ["p"], "attrs": {"activation": {"fn": "softmax"}}, "weights": {"kernel": "k3", "bias": "b3"}}
      ]}"#;
    let mut c = b"ENCPROG1".to_vec();
    c.extend_from_slice(&(json.len() as u64).to_le_bytes());
    c.extend_from_slice(json.as_bytes());
    c.extend_from_slice(&st);
    let p = Program::from_container(&c).unwrap();
    let mut ex = Executor::new(&p, 64, threads).unwrap();
    println!(
        "threads={threads} weights backing={}",
        p.weights_backing().as_str()
    );
    for batch in [1usize, 64] {
        let x: Vec<f32> = (0..batch * 512)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut y = vec![0.0f32; batch * 67];
        let iters = if batch == 1 { 2000 } else { 200 };
        for _ in 0..iters / 10 {
            ex.run(&x, batch, &mut y).unwrap();
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            ex.run(&x, batch, &mut y).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[iters / 2];
        println!(
            "batch {batch:3}: median {med:.4} ms  p10 {:.4} ms  => {:.0} samples/s  (y[0..3]={:?})",
            times[iters / 10],
            batch as f64 / med * 1e3,
            &y[..3]
        );
    }
}
