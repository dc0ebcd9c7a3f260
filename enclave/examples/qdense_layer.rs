//! Dev-only benchmark: the int8 dense path (`panels32x4` weights, activations
//! quantised per row) as the worker runs it, on the worker's thread team.
//! `cargo run --release --example qdense_layer -- [M] [K] [N] [THREADS] [relu]` times
//! one layer `x[m × k] · w[k × n] + b`; `... -- head [M] [THREADS]` times the MIT67
//! head (512 → 2048 relu → 2048 relu → 67). Prints the median and fastest call over
//! ~0.6 s. Set `ENNCLAVE_QKERNEL` to pick a kernel family, `MISALIGN=1` to start the
//! kernels off a 64-byte boundary. Compare builds in one sitting (the VM's speed
//! drifts between sittings).

use std::time::Instant;

use ennclave_enclave::ops::qdense::{enable_amx, path, qdense_act, scratch_len, QKernel};
use ennclave_enclave::team::Team;

/// A packed int8 kernel `[ceil(n/32), ceil(k/4), 32, 4]` of arbitrary values.
fn layer(k: usize, n: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let len = n.div_ceil(32) * k.div_ceil(4) * 128;
    let q = (0..len).map(|i| ((i * 7919) % 255) as i8).collect();
    let scale = (0..n).map(|j| 1e-4 + j as f32 * 1e-7).collect();
    let bias = (0..n).map(|j| (j % 7) as f32 * 0.01 - 0.03).collect();
    (q, scale, bias)
}

fn time(mut call: impl FnMut()) -> (f64, f64) {
    for _ in 0..5 {
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
    (times[times.len() / 2] * 1e3, times[0] * 1e3)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let head = args.get(1).is_some_and(|s| s == "head");
    let off = usize::from(head);
    let arg = |i: usize, d: usize| args.get(i + off).and_then(|s| s.parse().ok()).unwrap_or(d);
    enable_amx();
    let dims: Vec<usize> = if head {
        vec![512, 2048, 2048, 67]
    } else {
        vec![arg(2, 2048), arg(3, 2048)]
    };
    let m = arg(1, 64);
    let threads = if head { arg(2, 2) } else { arg(4, 2) };
    let relu = head || args.get(5).is_some_and(|s| s == "relu");
    let layers: Vec<_> = dims.windows(2).map(|d| layer(d[0], d[1])).collect();
    let x: Vec<f32> = (0..m * dims[0])
        .map(|i| ((i * 31) % 1000) as f32 / 1e3 - 0.5)
        .collect();
    let mut bufs: Vec<Vec<f32>> = dims[1..].iter().map(|&n| vec![0f32; m * n]).collect();
    // The kernels 64-byte aligned, as `split` lays them out in the container (the
    // scratch int8 aligns itself); `MISALIGN=1` puts them 16 bytes past a line
    // instead, where an allocation of its own usually starts.
    let skew = if std::env::var_os("MISALIGN").is_some_and(|v| v == "1") {
        16
    } else {
        0
    };
    let qs: Vec<(Vec<i8>, usize)> = layers
        .iter()
        .map(|(q, _, _)| {
            let mut v = vec![0i8; q.len() + 128];
            let at = v.as_ptr().align_offset(64) + skew;
            v[at..at + q.len()].copy_from_slice(q);
            (v, at)
        })
        .collect();
    // The executor's scratch, as the worker plans it (the widest layer's rows).
    let widest = dims[..dims.len() - 1].iter().copied().max().unwrap_or(0);
    let mut scratch = vec![0f32; scratch_len(m, widest)];
    let team = Team::new(threads, 200).expect("threads");
    let (med, best) = team.install(|| {
        time(|| {
            for (l, (_, scale, bias)) in layers.iter().enumerate() {
                let q = &qs[l].0[qs[l].1..][..layers[l].0.len()];
                let (k, n) = (dims[l], dims[l + 1]);
                // The last layer of the head is softmax's input: no ReLU.
                let r = relu && !(head && l == layers.len() - 1);
                let (done, rest) = bufs.split_at_mut(l);
                let input = if l == 0 { &x[..] } else { &done[l - 1][..] };
                let w = QKernel::Int8 { q, scale };
                let (y, s) = (&mut rest[0], &mut scratch[..]);
                qdense_act(input, w, Some(bias), y, m, k, n, threads, r, s);
            }
        })
    });
    let what = if head {
        "MIT67 head".to_string()
    } else {
        format!("k={} n={}", dims[0], dims[1])
    };
    println!(
        "int8 {} m={m} {what} threads={threads} relu={relu}: median {med:.3} ms, fastest {best:.3} ms",
        path().name()
    );
}
