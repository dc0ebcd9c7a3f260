//! Dev-only benchmark: one dense layer `x[m × k] · w[k × n] + b` with a `panels32`
//! kernel, as the worker runs it (rows of `x` packed into scratch where it packs).
//! `cargo run --release --example dense_layer -- [M] [K] [N] [THREADS] [relu]`
//! prints the median and fastest call over ~0.6 s and GFLOP/s. Compare layouts or
//! builds in one sitting (the VM's speed drifts between sittings).

use std::time::Instant;

use ennclave_enclave::ops::dense::{dense_scratch, pack_panels, scratch_len, Kernel};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (m, k, n, threads) = (arg(1, 256), arg(2, 2048), arg(3, 2048), arg(4, 1));
    let relu = args.get(5).is_some_and(|s| s == "relu");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1e4 - 0.05)
        .collect();
    let wp = pack_panels(&w, k, n);
    let b = vec![0.1f32; n];
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 31) % 1000) as f32 / 1e3 - 0.5)
        .collect();
    let mut y = vec![0.0f32; m * n];
    let mut scratch = vec![0.0f32; scratch_len(m, threads)];
    let mut call = || {
        let w = Kernel::Panels(&wp);
        dense_scratch(
            &x,
            w,
            Some(&b),
            &mut y,
            m,
            k,
            n,
            threads,
            &mut scratch,
            relu,
        );
    };
    for _ in 0..3 {
        call();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 0.6 {
        let t = Instant::now();
        call();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    let gflops = 2.0 * (m * k * n) as f64 / med / 1e9;
    println!(
        "m={m} k={k} n={n} threads={threads} relu={relu}: median {:.3} ms, fastest {:.3} ms, \
         {gflops:.1} GFLOP/s",
        med * 1e3,
        times[0] * 1e3
    );
}
