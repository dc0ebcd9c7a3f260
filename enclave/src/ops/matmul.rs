//! Batched matrix product of two computed tensors: `[N, ..., M, K] × [N, ..., K, P]`,
//! either operand optionally stored transposed. One gemm call per `M × P` slice (the
//! transposes are only strides); slices are spread over the threads when there are
//! enough of them, else each slice's gemm uses the threads itself.

use super::{par_for, parallelism, SendPtr};

/// Resolved at load time. Per sample there are `slices` independent products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matmul {
    pub slices: usize,
    pub m: usize,
    pub k: usize,
    pub p: usize,
    /// `a` is stored `[..., K, M]`.
    pub trans_a: bool,
    /// `b` is stored `[..., P, K]`.
    pub trans_b: bool,
}

impl Matmul {
    /// Floats of one slice of a, of b, of the output.
    fn lens(&self) -> (usize, usize, usize) {
        (self.m * self.k, self.k * self.p, self.m * self.p)
    }

    /// FLOPs of one slice.
    fn flops(&self) -> usize {
        2 * self.m * self.k * self.p
    }
}

/// An embedding lookup: `rows` rows of `row_len` floats at `table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gather {
    /// Ids per sample.
    pub ids: usize,
    pub rows: usize,
    pub row_len: usize,
    pub table: crate::program::WRef,
}

/// `y[i] = table[ids[i]]` for every id (float32 values that must be integers in
/// `0..rows`); the first id that is not gives an error naming it and its place.
pub fn gather(ids: &[f32], table: &[f32], y: &mut [f32], g: &Gather) -> Result<(), String> {
    let d = g.row_len;
    for (i, (&v, out)) in ids.iter().zip(y.chunks_exact_mut(d.max(1))).enumerate() {
        if !(v >= 0.0 && v < g.rows as f32 && v.fract() == 0.0) {
            return Err(format!(
                "id {v} (sample {}, position {}) is not an integer in 0..{} (the rows of its table)",
                i / g.ids.max(1),
                i % g.ids.max(1),
                g.rows
            ));
        }
        let r = v as usize;
        out.copy_from_slice(&table[r * d..(r + 1) * d]);
    }
    Ok(())
}

/// `y = a · b` for `batch` samples (shapes validated by `program`).
pub fn matmul(a: &[f32], b: &[f32], y: &mut [f32], batch: usize, mm: &Matmul, threads: usize) {
    let (la, lb, ly) = mm.lens();
    let total = batch * mm.slices;
    if total == 0 || ly == 0 {
        return;
    }
    assert!(a.len() >= total * la && b.len() >= total * lb && y.len() >= total * ly);
    if mm.k == 0 {
        y[..total * ly].fill(0.0);
        return;
    }
    let yp = SendPtr(y.as_mut_ptr());
    // Spread whole slices over the threads when each thread gets at least one and the
    // work is worth a hand-off; else one slice after the other, gemm threading each.
    let parts = threads.min(total);
    if parts > 1 && total * mm.flops() >= 1 << 15 {
        par_for(parts, &|t| {
            for s in total * t / parts..total * (t + 1) / parts {
                // SAFETY: slice s of y belongs to this task alone; a, b, y hold `total`
                // slices (asserted above) and every task ends before our borrow of y.
                unsafe { one(a, b, yp, s, mm, gemm::Parallelism::None) };
            }
        });
    } else {
        let par = if mm.flops() >= 1 << 20 {
            parallelism(threads)
        } else {
            gemm::Parallelism::None
        };
        for s in 0..total {
            // SAFETY: as above, on this thread only.
            unsafe { one(a, b, yp, s, mm, par) };
        }
    }
}

/// Slice `s`: `y[s] = a[s] · b[s]`.
///
/// # Safety
/// `a`, `b` and the buffer behind `y` must hold at least `s + 1` slices, and slice `s`
/// of `y` must not be touched by anyone else during the call.
unsafe fn one(a: &[f32], b: &[f32], y: SendPtr, s: usize, mm: &Matmul, par: gemm::Parallelism) {
    let (la, lb, ly) = mm.lens();
    let (m, k, p) = (mm.m, mm.k, mm.p);
    // (column stride, row stride) of the logical M×K and K×P operands.
    let (a_cs, a_rs) = if mm.trans_a { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if mm.trans_b { (k, 1) } else { (1, p) };
    // SAFETY: the caller's contract; gemm reads slice s of a and b and writes slice s
    // of y within those shapes and strides (read_dst false: y is only written).
    unsafe {
        gemm::gemm(
            m,
            p,
            k,
            y.get().add(s * ly),
            1,
            p as isize,
            false,
            a.as_ptr().add(s * la),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr().add(s * lb),
            b_cs as isize,
            b_rs as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], mm: &Matmul, batch: usize) -> Vec<f32> {
        let (m, k, p) = (mm.m, mm.k, mm.p);
        let mut y = vec![0.0f32; batch * mm.slices * m * p];
        for s in 0..batch * mm.slices {
            for i in 0..m {
                for j in 0..p {
                    let mut acc = 0.0f32;
                    for kk in 0..k {
                        let av = if mm.trans_a {
                            a[s * m * k + kk * m + i]
                        } else {
                            a[s * m * k + i * k + kk]
                        };
                        let bv = if mm.trans_b {
                            b[s * k * p + j * k + kk]
                        } else {
                            b[s * k * p + kk * p + j]
                        };
                        acc += av * bv;
                    }
                    y[s * m * p + i * p + j] = acc;
                }
            }
        }
        y
    }

    #[test]
    fn all_transposes_and_thread_counts() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for threads in [1, 3] {
                let mm = Matmul {
                    slices: 4,
                    m: 5,
                    k: 7,
                    p: 6,
                    trans_a,
                    trans_b,
                };
                let batch = 3;
                let a: Vec<f32> = (0..batch * 4 * 35)
                    .map(|i| ((i * 7 % 13) as f32) - 6.0)
                    .collect();
                let b: Vec<f32> = (0..batch * 4 * 42)
                    .map(|i| ((i * 5 % 11) as f32) * 0.5 - 2.0)
                    .collect();
                let mut y = vec![f32::NAN; batch * 4 * 30];
                pool.install(|| matmul(&a, &b, &mut y, batch, &mm, threads));
                let want = naive(&a, &b, &mm, batch);
                for (g, w) in y.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
    }
}
