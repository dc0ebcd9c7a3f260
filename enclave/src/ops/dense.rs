//! Dense layers / matrix products: `y[m, n] = x[m, k] · w[k, n] (+ bias[n])`.
//!
//! `w` stays in the Keras `[in, out]` layout (row-major `k × n`), which is what gemm
//! wants for larger `m`. For small `m` (batch-1 inference is a memory-bound GEMV)
//! gemm runs single-threaded, so we use our own kernel: the output columns are split
//! into one contiguous range per thread, and each thread streams its part of every
//! weight row once, accumulating four rows of `w` per pass over its output range.

use super::{par_for, parallelism, SendPtr};

/// Up to this many rows, use the streaming kernel instead of gemm.
pub const SMALL_M: usize = 4;

/// `y = x · w + bias`. `x` is `m × k`, `w` is `k × n`, `y` is `m × n`, all row-major.
pub fn dense(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert!(x.len() >= m * k && w.len() >= k * n && y.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    let y = &mut y[..m * n];
    match bias {
        Some(b) => {
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(&b[..n]);
            }
        }
        None => y.fill(0.0),
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    if m <= SMALL_M {
        gemv(x, w, y, m, k, n, threads);
    } else {
        // SAFETY: the assert above guarantees x holds m×k, w k×n and y m×n elements,
        // laid out row-major with the strides given; y does not alias x or w (it is
        // a distinct &mut borrow).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                1,
                n as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism(threads),
            )
        }
    }
}

/// `y += x · w` for small `m`, parallel over output columns.
fn gemv(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    // At least 256 columns (1 KiB of each weight row) per task, 16-aligned.
    let max_parts = n.div_ceil(256).max(1);
    let parts = threads.clamp(1, max_parts);
    let per = n.div_ceil(parts).div_ceil(16) * 16;
    let yp = SendPtr(y.as_mut_ptr());
    par_for(parts, &|p| {
        let c0 = (p * per).min(n);
        let c1 = ((p + 1) * per).min(n);
        if c0 >= c1 {
            return;
        }
        let yp = yp;
        let mut rows: [&mut [f32]; SMALL_M] = Default::default();
        for (r, row) in rows.iter_mut().enumerate().take(m) {
            // SAFETY: y has m×n elements (asserted by `dense`); row r's columns
            // c0..c1 lie inside it, and the column ranges of different tasks are
            // disjoint, so these &mut slices never overlap each other or any other
            // live reference; all tasks end before `dense`'s borrow of y does.
            *row = unsafe { std::slice::from_raw_parts_mut(yp.0.add(r * n + c0), c1 - c0) };
        }
        gemv_cols(x, w, &mut rows[..m], k, n, c0);
    });
}

fn gemv_cols(x: &[f32], w: &[f32], ys: &mut [&mut [f32]], k: usize, n: usize, c0: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { gemv_cols_avx2(x, w, ys, k, n, c0) };
            return;
        }
    }
    gemv_cols_generic(x, w, ys, k, n, c0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_cols_avx2(x: &[f32], w: &[f32], ys: &mut [&mut [f32]], k: usize, n: usize, c0: usize) {
    gemv_cols_generic(x, w, ys, k, n, c0)
}

#[inline(always)]
fn gemv_cols_generic(x: &[f32], w: &[f32], ys: &mut [&mut [f32]], k: usize, n: usize, c0: usize) {
    let width = match ys.first() {
        Some(r) => r.len(),
        None => return,
    };
    let k4 = k / 4 * 4;
    let mut i = 0;
    while i < k4 {
        let w0 = &w[i * n + c0..][..width];
        let w1 = &w[(i + 1) * n + c0..][..width];
        let w2 = &w[(i + 2) * n + c0..][..width];
        let w3 = &w[(i + 3) * n + c0..][..width];
        for (r, y) in ys.iter_mut().enumerate() {
            let xr = &x[r * k + i..][..4];
            let (a0, a1, a2, a3) = (xr[0], xr[1], xr[2], xr[3]);
            let y = &mut y[..width];
            for j in 0..width {
                y[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
            }
        }
        i += 4;
    }
    while i < k {
        let w0 = &w[i * n + c0..][..width];
        for (r, y) in ys.iter_mut().enumerate() {
            let a0 = x[r * k + i];
            let y = &mut y[..width];
            for j in 0..width {
                y[j] += a0 * w0[j];
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = b.map_or(0.0, |b| b[c]) as f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[i * n + c] as f64;
                }
                y[r * n + c] = s as f32;
            }
        }
        y
    }

    fn vals(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn hand_checked() {
        // [1 2] · [[1 2 3] [4 5 6]] + [1 1 1] = [10 13 16]
        let mut y = [0.0; 3];
        dense(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], Some(&[1.0; 3]), &mut y, 1, 2, 3, 1);
        assert_eq!(y, [10.0, 13.0, 16.0]);
    }

    #[test]
    fn matches_naive_all_paths() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(m, k, n) in &[(1, 7, 5), (1, 513, 1000), (2, 33, 300), (4, 9, 17), (5, 64, 70), (37, 130, 9)] {
            for threads in [1, 3] {
                let x = vals(m * k, 1);
                let w = vals(k * n, 2);
                let b = vals(n, 3);
                let want = naive(&x, &w, Some(&b), m, k, n);
                let mut y = vec![f32::NAN; m * n];
                pool.install(|| dense(&x, &w, Some(&b), &mut y, m, k, n, threads));
                for (a, e) in y.iter().zip(&want) {
                    assert!((a - e).abs() < 1e-3, "m={m} k={k} n={n}: {a} vs {e}");
                }
                let want = naive(&x, &w, None, m, k, n);
                pool.install(|| dense(&x, &w, None, &mut y, m, k, n, threads));
                for (a, e) in y.iter().zip(&want) {
                    assert!((a - e).abs() < 1e-3);
                }
            }
        }
    }
}
