//! Per-layer times of the image model's CNN (`benchmarks/bench_matrix.py`: three 3×3
//! "same" convolutions, 1→32→64→64 channels on 28×28, each of the first two followed
//! by a 2×2 max pool), calling the conv and pool kernels directly: each conv alone,
//! the conv with its pool fused (as the executor runs it), and the pool alone. Fastest
//! of 30 calls, in µs.
//!
//!     cargo run --release --example conv_layers -- [BATCH 64] [THREADS 1]
//!
//! THREADS sets the kernels' tasks (outside the executor they run on rayon's global
//! pool); with 1 the numbers are one core's, the steadiest on a shared machine.

use ennclave_enclave::ops::conv::{self, ConvParams, Geom};
use ennclave_enclave::ops::Act;
use std::time::Instant;

fn geom(h: usize, c: usize, k: usize, s: usize, pad: usize) -> Geom {
    let o = (h + 2 * pad - k) / s + 1;
    Geom {
        h,
        w: h,
        c,
        oh: o,
        ow: o,
        kh: k,
        kw: k,
        sh: s,
        sw: s,
        dh: 1,
        dw: 1,
        pt: pad,
        pl: pad,
    }
}

fn best_us(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b * 1e6
}

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .map_or(d, |s| s.parse().expect("a number"))
    };
    let (batch, threads) = (arg(1, 64), arg(2, 1));
    let reps = 30;
    for (i, &(h, c, cout)) in [(28, 1, 32), (14, 32, 64), (7, 64, 64)].iter().enumerate() {
        let p = ConvParams {
            g: geom(h, c, 3, 1, 1),
            cout,
            groups: 1,
            act: Act::Relu,
            pool: None,
        };
        let x: Vec<f32> = (0..batch * h * h * c)
            .map(|i| (i % 7) as f32 * 0.1)
            .collect();
        let k: Vec<f32> = (0..9 * c * cout).map(|i| (i % 5) as f32 * 0.01).collect();
        let b = vec![0.1f32; cout];
        let mut y = vec![0.0f32; batch * h * h * cout];
        let mut s = vec![0.0f32; p.scratch_len(batch, threads)];
        let t = best_us(reps, || {
            conv::conv(&x, &k, Some(&b), &mut y, batch, &p, &mut s, threads)
        });
        print!("conv{} {t:.0}", i + 1);
        if i < 2 {
            let pg = geom(h, cout, 2, 2, 0);
            let mut z = vec![0.0f32; batch * (h / 2) * (h / 2) * cout];
            let mut pf = p.clone();
            pf.pool = Some(pg.clone());
            let mut s2 = vec![0.0f32; pf.scratch_len(batch, threads)];
            let tf = best_us(reps, || {
                conv::conv(&x, &k, Some(&b), &mut z, batch, &pf, &mut s2, threads)
            });
            let tp = best_us(reps, || {
                conv::pool(&y, &mut z, batch, &pg, true, false, threads)
            });
            print!(" (+ pool{}: fused {tf:.0}, pool alone {tp:.0})", i + 1);
        }
        println!(" µs");
    }
}
