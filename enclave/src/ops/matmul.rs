//! Batched matrix product of two computed tensors: `[N, ..., M, K] × [N, ..., K, P]`,
//! either operand optionally stored transposed. Each `M × P` slice is one call of the
//! dense kernels (`ops::dense`, the right operand read as a row-major kernel); an
//! operand stored transposed is first transposed into scratch the executor planned
//! (per task), so nothing is allocated at run time. Slices are spread over the threads
//! when there are enough of them, else each slice's product uses the threads itself.

use super::dense::{self, Kernel};
use super::{par_for, SendPtr};

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

    /// Scratch floats one task needs: room for a row-major copy of each operand
    /// stored transposed.
    fn scratch_per_task(&self) -> usize {
        let (la, lb, _) = self.lens();
        la * usize::from(self.trans_a) + lb * usize::from(self.trans_b)
    }

    /// Scratch floats [`matmul`] needs on `threads` threads.
    pub fn scratch_len(&self, threads: usize) -> usize {
        self.scratch_per_task() * threads.max(1)
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

/// `y = a · b` for `batch` samples (shapes validated by `program`); `scratch` holds at
/// least [`Matmul::scratch_len`]`(threads)` floats.
pub fn matmul(
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    batch: usize,
    mm: &Matmul,
    scratch: &mut [f32],
    threads: usize,
) {
    let (la, lb, ly) = mm.lens();
    let total = batch * mm.slices;
    if total == 0 || ly == 0 {
        return;
    }
    assert!(a.len() >= total * la && b.len() >= total * lb && y.len() >= total * ly);
    let per = mm.scratch_per_task();
    let parts = threads.clamp(1, total);
    assert!(scratch.len() >= per * parts);
    // Spread whole slices over the threads when each thread gets at least one and the
    // work is worth a hand-off; else one slice after the other, the kernel threading
    // each.
    if parts > 1 && total * mm.flops() >= 1 << 15 {
        let (yp, sp) = (SendPtr(y.as_mut_ptr()), SendPtr(scratch.as_mut_ptr()));
        par_for(parts, &|t| {
            // SAFETY: task t alone uses scratch floats t·per..(t+1)·per (asserted to
            // exist above) and the output slices of its range; every task ends before
            // our borrows of y and scratch do.
            let scr = unsafe { std::slice::from_raw_parts_mut(sp.get().add(t * per), per) };
            for s in total * t / parts..total * (t + 1) / parts {
                // SAFETY: as above: slice s of y belongs to this task alone.
                let ys = unsafe { std::slice::from_raw_parts_mut(yp.get().add(s * ly), ly) };
                one(a, b, ys, s, mm, scr, 1);
            }
        });
    } else {
        for (s, ys) in y[..total * ly].chunks_exact_mut(ly).enumerate() {
            one(a, b, ys, s, mm, &mut scratch[..per], threads);
        }
    }
}

/// Slice `s`: `y = a[s] · b[s]`, on `threads` threads.
fn one(
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    s: usize,
    mm: &Matmul,
    scratch: &mut [f32],
    threads: usize,
) {
    let (la, lb, _) = mm.lens();
    let (m, k, p) = (mm.m, mm.k, mm.p);
    let (a, b) = (&a[s * la..][..la], &b[s * lb..][..lb]);
    let (ta, tb) = scratch.split_at_mut(if mm.trans_a { la } else { 0 });
    let x: &[f32] = if mm.trans_a {
        transpose(a, k, m, ta);
        ta
    } else {
        a
    };
    let w: &[f32] = if mm.trans_b {
        transpose(b, p, k, &mut tb[..lb]);
        &tb[..lb]
    } else {
        b
    };
    dense::dense(x, Kernel::Rows(w), None, y, m, k, p, threads);
}

/// `out[c × r] = src[r × c]ᵀ`, both row-major, in 8 × 8 tiles (each tile's rows and
/// columns stay in cache lines already read).
fn transpose(src: &[f32], r: usize, c: usize, out: &mut [f32]) {
    const T: usize = 8;
    for i0 in (0..r).step_by(T) {
        for j0 in (0..c).step_by(T) {
            for i in i0..(i0 + T).min(r) {
                for j in j0..(j0 + T).min(c) {
                    out[j * r + i] = src[i * c + j];
                }
            }
        }
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
        // Small slices spread over the threads; a few large ones (several row blocks
        // and panels of the dense kernel, one slice of batch 1 threading itself).
        let shapes = [(4, 5, 7, 6, 3), (2, 29, 40, 70, 1), (1, 1, 9, 33, 2)];
        for (slices, m, k, p, batch) in shapes {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                for threads in [1, 3] {
                    let mm = Matmul {
                        slices,
                        m,
                        k,
                        p,
                        trans_a,
                        trans_b,
                    };
                    let n = batch * slices;
                    let a: Vec<f32> = (0..n * m * k)
                        .map(|i| ((i * 7 % 13) as f32) - 6.0)
                        .collect();
                    let b: Vec<f32> = (0..n * k * p)
                        .map(|i| ((i * 5 % 11) as f32) * 0.5 - 2.0)
                        .collect();
                    let mut y = vec![f32::NAN; n * m * p];
                    let mut scratch = vec![f32::NAN; mm.scratch_len(threads)];
                    pool.install(|| matmul(&a, &b, &mut y, batch, &mm, &mut scratch, threads));
                    let want = naive(&a, &b, &mm, batch);
                    for (g, w) in y.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{mm:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
