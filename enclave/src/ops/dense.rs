//! Dense layers / matrix products: `y[m, n] = x[m, k] · w[k, n] (+ bias[n])`.
//!
//! The kernel is packed once at load (`pack`) into column panels of `NR` = 32
//! columns: panel `p` holds `w[0..k, 32p..32p+32]` row by row, contiguous, the last
//! panel zero-padded. One layout serves both batch-1 GEMV (memory-bound: every
//! panel is one sequential stream) and larger batches (a register-blocked
//! micro-kernel of up to `MR` rows × 32 columns). Panels are split across threads.
//! An AVX-512 kernel is used where the CPU has it, else a portable one that LLVM
//! vectorises (with AVX2+FMA when available).

use super::{par_for, SendPtr};

/// Columns per packed panel.
pub const NR: usize = 32;
/// Rows per AVX-512 micro-kernel call (12×2 accumulators + 2 weights + 1 broadcast
/// fit the 32 zmm registers).
const MR: usize = 12;
/// Rows per portable micro-kernel call.
const MR_PORTABLE: usize = 4;

/// Floats of a packed `k × n` kernel.
pub fn packed_len(k: usize, n: usize) -> Option<usize> {
    n.div_ceil(NR).checked_mul(NR)?.checked_mul(k)
}

/// Pack a row-major `k × n` kernel, given element by element (`w(i)` = element `i`
/// in row-major order), into `dst` (`packed_len(k, n)` floats).
pub fn pack(k: usize, n: usize, mut w: impl FnMut(usize) -> f32, dst: &mut [f32]) {
    for (p, panel) in dst.chunks_exact_mut(k * NR).enumerate() {
        for (i, row) in panel.chunks_exact_mut(NR).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let c = p * NR + j;
                *v = if c < n { w(i * n + c) } else { 0.0 };
            }
        }
    }
}

/// `y = x · w + bias` with `w` packed by [`pack`]. `x` is `m × k`, `y` is `m × n`,
/// both row-major.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    x: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    let np = n.div_ceil(NR);
    assert!(x.len() >= m * k && y.len() >= m * n && wp.len() >= np * NR * k);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in y[..m * n].chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(&b[..n]),
                None => row.fill(0.0),
            }
        }
        return;
    }
    let avx512 = has_avx512();
    // Enough panels per task to amortise the fork (≥ ~64 KiB of weights each).
    let min_panels = (16384 / (k * NR)).max(1);
    let parts = threads.clamp(1, np.div_ceil(min_panels).max(1));
    let yp = SendPtr(y.as_mut_ptr());
    par_for(parts, &|t| {
        let p0 = np * t / parts;
        let p1 = np * (t + 1) / parts;
        for p in p0..p1 {
            let c0 = p * NR;
            let ncols = NR.min(n - c0);
            let panel = &wp[p * k * NR..][..k * NR];
            let b = bias.map(|b| &b[c0..c0 + ncols]);
            let step = if avx512 { MR } else { MR_PORTABLE };
            let mut r0 = 0;
            while r0 < m {
                let rows = step.min(m - r0);
                let xs = &x[r0 * k..(r0 + rows) * k];
                // SAFETY: rows r0..r0+rows, columns c0..c0+ncols of y lie inside y
                // (m×n, asserted) and belong to this task alone (panels are split
                // between tasks); all tasks end before `dense`'s borrow of y does.
                unsafe {
                    let yb = yp.get().add(r0 * n + c0);
                    micro(avx512, rows, xs, k, panel, b, yb, n, ncols);
                }
                r0 += rows;
            }
        }
    });
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One block of `rows` rows × one panel. `y` points at the block's first element;
/// its rows are `ldy` apart and `ncols` (≤ 32) columns are written.
///
/// # Safety
/// `y + r*ldy .. + ncols` must be valid for writes for every `r < rows`, and not
/// aliased by any live reference; `rows <= MR` (AVX-512) / `MR_PORTABLE`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    avx512: bool,
    rows: usize,
    x: &[f32],
    k: usize,
    panel: &[f32],
    bias: Option<&[f32]>,
    y: *mut f32,
    ldy: usize,
    ncols: usize,
) {
    debug_assert!(x.len() == rows * k && panel.len() == k * NR && ncols <= NR);
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: avx512f is available (checked by the caller); x holds
                    // `rows` rows of k floats, panel k×32, bias ≥ ncols floats, and
                    // y has `rows` rows of ≥ ncols writable floats `ldy` apart.
                    $($r => unsafe { avx512::kernel::<$r>(x, k, panel, bias, y, ldy, ncols) },)*
                    _ => unreachable!("rows <= MR"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8 9 10 11 12);
        return;
    }
    let _ = avx512;
    let mut acc = [[0.0f32; NR]; MR_PORTABLE];
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            portable_avx2(rows, x, k, panel, &mut acc)
        };
    } else {
        portable(rows, x, k, panel, &mut acc);
    }
    for (r, a) in acc.iter().enumerate().take(rows) {
        for (j, &v) in a.iter().enumerate().take(ncols) {
            let v = v + bias.map_or(0.0, |b| b[j]);
            // SAFETY: row r < rows and column j < ncols of the block (caller's contract).
            unsafe { *y.add(r * ldy + j) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn portable_avx2(
    rows: usize,
    x: &[f32],
    k: usize,
    panel: &[f32],
    acc: &mut [[f32; NR]; MR_PORTABLE],
) {
    portable(rows, x, k, panel, acc)
}

#[inline(always)]
fn portable(rows: usize, x: &[f32], k: usize, panel: &[f32], acc: &mut [[f32; NR]; MR_PORTABLE]) {
    for (i, w) in panel.chunks_exact(NR).enumerate().take(k) {
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let xv = x[r * k + i];
            for (av, &wv) in a.iter_mut().zip(w) {
                *av += xv * wv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `y[0..R, 0..ncols] = x[R × k] · panel[k × 32] + bias`.
    ///
    /// # Safety
    /// avx512f must be available; `x.len() >= R*k`, `panel.len() >= 32*k`, `bias`
    /// (if any) has ≥ `ncols` floats, and `y` must be valid for writes of `ncols`
    /// floats at `y + r*ldy` for every `r < R`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel<const R: usize>(
        x: &[f32],
        k: usize,
        panel: &[f32],
        bias: Option<&[f32]>,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
    ) {
        debug_assert!(x.len() >= R * k && panel.len() >= 32 * k && ncols <= 32);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let xp = x.as_ptr();
        let wp = panel.as_ptr();
        for i in 0..k {
            // SAFETY (whole loop): i < k, so the panel reads i*32..i*32+32 < 32k and
            // the x reads r*k + i < R*k stay inside the slices.
            let w0 = _mm512_loadu_ps(wp.add(i * 32));
            let w1 = _mm512_loadu_ps(wp.add(i * 32 + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * k + i));
                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
            }
        }
        let m0: __mmask16 = if ncols >= 16 {
            0xffff
        } else {
            ((1u32 << ncols) - 1) as u16
        };
        let m1: __mmask16 = if ncols >= 32 {
            0xffff
        } else if ncols > 16 {
            ((1u32 << (ncols - 16)) - 1) as u16
        } else {
            0
        };
        let (b0, b1) = match bias {
            // Masked-off lanes are never read (AVX-512 masked loads suppress
            // faults), so only bias[0..ncols] is touched.
            Some(b) => (
                _mm512_maskz_loadu_ps(m0, b.as_ptr()),
                _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16)),
            ),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for (r, a) in acc.iter().enumerate() {
            let yr = y.add(r * ldy);
            _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(a[0], b0));
            _mm512_mask_storeu_ps(yr.add(16), m1, _mm512_add_ps(a[1], b1));
        }
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

    fn packed(w: &[f32], k: usize, n: usize) -> Vec<f32> {
        let mut p = vec![f32::NAN; packed_len(k, n).unwrap()];
        pack(k, n, |i| w[i], &mut p);
        p
    }

    #[test]
    fn hand_checked() {
        // [1 2] · [[1 2 3] [4 5 6]] + [1 1 1] = [10 13 16]
        let mut y = [0.0; 3];
        let wp = packed(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        dense(&[1.0, 2.0], &wp, Some(&[1.0; 3]), &mut y, 1, 2, 3, 1);
        assert_eq!(y, [10.0, 13.0, 16.0]);
    }

    #[test]
    fn matches_naive_all_shapes() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for &(m, k, n) in &[
            (1, 7, 5),
            (1, 513, 1000),
            (2, 33, 300),
            (4, 9, 17),
            (5, 64, 70),
            (13, 130, 9),
            (37, 20, 64),
            (64, 100, 33),
        ] {
            for threads in [1, 3] {
                let x = vals(m * k, 1);
                let w = vals(k * n, 2);
                let wp = packed(&w, k, n);
                let b = vals(n, 3);
                for bias in [Some(&b[..]), None] {
                    let want = naive(&x, &w, bias, m, k, n);
                    let mut y = vec![f32::NAN; m * n];
                    pool.install(|| dense(&x, &wp, bias, &mut y, m, k, n, threads));
                    for (a, e) in y.iter().zip(&want) {
                        assert!((a - e).abs() < 1e-3, "m={m} k={k} n={n}: {a} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn portable_kernel_matches() {
        let (m, k, n) = (6, 19, 45);
        let x = vals(m * k, 4);
        let w = vals(k * n, 5);
        let wp = packed(&w, k, n);
        let b = vals(n, 6);
        let want = naive(&x, &w, Some(&b), m, k, n);
        let mut y = vec![f32::NAN; m * n];
        for p in 0..n.div_ceil(NR) {
            let c0 = p * NR;
            let mut r0 = 0;
            while r0 < m {
                let rows = MR_PORTABLE.min(m - r0);
                let yb = y[r0 * n + c0..].as_mut_ptr();
                // SAFETY: the block (rows × ncols, row stride n) lies inside y.
                unsafe {
                    micro(
                        false,
                        rows,
                        &x[r0 * k..(r0 + rows) * k],
                        k,
                        &wp[p * k * NR..][..k * NR],
                        Some(&b[c0..]),
                        yb,
                        n,
                        NR.min(n - c0),
                    )
                };
                r0 += rows;
            }
        }
        for (a, e) in y.iter().zip(&want) {
            assert!((a - e).abs() < 1e-3);
        }
    }
}
