//! Kernels. Everything is float32, channels-last, row-major; the batch dimension is
//! the outermost one. Kernels assume the shapes were validated by `program` and
//! that they run inside the executor's rayon pool and thread team: [`par_for`] runs
//! on the team (`crate::team`, spinning helpers), gemm's `Parallelism::Rayon` on the
//! pool's persistent threads.

pub mod act;
pub mod binary;
pub mod conv;
pub mod conv_transpose;
pub mod dense;
pub mod matmul;
pub mod misc;
pub mod qdense;
pub mod resize;
pub mod slice;
pub mod vmath;

pub use act::Act;

use std::sync::atomic::{AtomicUsize, Ordering};

/// Run `f(i)` for `i in 0..n` in parallel: on the thread team the caller owns
/// (the executor's, see `crate::team`), else on the current rayon pool, splitting by
/// `rayon::join` (no heap allocation, unlike `rayon::scope`).
pub fn par_for<F: Fn(usize) + Sync>(n: usize, f: &F) {
    if crate::team::run_on_current(n, f).is_some() {
        return;
    }
    fn go<F: Fn(usize) + Sync>(lo: usize, hi: usize, f: &F) {
        if hi <= lo {
            return;
        }
        if hi - lo == 1 {
            f(lo);
            return;
        }
        let mid = lo + (hi - lo) / 2;
        rayon::join(|| go(lo, mid, f), || go(mid, hi, f));
    }
    go(0, n, f)
}

/// Call `f(first, rows)` on `parts` contiguous ranges of the `row_len`-long rows of
/// `buf` (`first`: the index of the range's first row), in parallel on the current
/// rayon pool.
pub fn par_row_ranges<F: Fn(usize, &mut [f32]) + Sync>(
    buf: &mut [f32],
    row_len: usize,
    parts: usize,
    f: &F,
) {
    if row_len == 0 {
        return;
    }
    let rows = buf.len() / row_len;
    let parts = parts.clamp(1, rows.max(1));
    if parts == 1 {
        f(0, &mut buf[..rows * row_len]);
        return;
    }
    let p = SendPtr(buf.as_mut_ptr());
    par_for(parts, &|t| {
        let (a, b) = (rows * t / parts, rows * (t + 1) / parts);
        // SAFETY: rows a..b lie inside buf (b ≤ rows = buf.len() / row_len), and the
        // ranges of different tasks are disjoint; every task ends before par_for
        // returns, inside our &mut borrow of buf.
        let mine =
            unsafe { std::slice::from_raw_parts_mut(p.get().add(a * row_len), (b - a) * row_len) };
        f(a, mine);
    });
}

/// Call `f(i, row)` for every `row_len`-long row `i` of `buf`, with the rows cut into
/// `parts` contiguous ranges that run in parallel on the current rayon pool.
pub fn par_rows<F: Fn(usize, &mut [f32]) + Sync>(
    buf: &mut [f32],
    row_len: usize,
    parts: usize,
    f: &F,
) {
    par_row_ranges(buf, row_len, parts, &|first, rows| {
        for (i, row) in rows.chunks_exact_mut(row_len).enumerate() {
            f(first + i, row);
        }
    });
}

/// `gemm::Parallelism` for a thread count.
pub fn parallelism(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// Work a parallel loop's tasks take as they go instead of a fixed share each: units
/// `0..n` in `runs` contiguous runs of near-equal length, each handed out once. On a VM
/// whose cores run at different speeds (a busy neighbour on one core's other
/// hyperthread: this repository's Intel VM ran the image model's convolutions 1.5×
/// slower on one core than on the other, the slow core changing from minute to
/// minute), a static split leaves the faster thread waiting for the slower one.
///
/// The team already hands out task indices as threads come free, but a task owns a
/// scratch slot (a kernel's padded or packed rows): more tasks would need more scratch.
/// Claims keep one task per thread and let each take several runs of the work.
pub(crate) struct Claims {
    next: AtomicUsize,
    n: usize,
    runs: usize,
}

impl Claims {
    pub(crate) fn new(n: usize, runs: usize) -> Claims {
        Claims {
            next: AtomicUsize::new(0),
            n,
            runs: runs.max(1).min(n),
        }
    }

    /// The next run of units not yet taken, or `None` when all are.
    pub(crate) fn take(&self) -> Option<std::ops::Range<usize>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.runs).then(|| self.n * i / self.runs..self.n * (i + 1) / self.runs)
    }
}

/// A raw pointer that may be shared between the tasks of one parallel loop, each of
/// which writes a disjoint part of the buffer it points into.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: only used to hand disjoint regions of one `&mut [f32]` to the tasks of a
// single `par_for`, which all finish before that borrow ends.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_hand_out_every_unit_once() {
        for (n, runs) in [(9, 8), (10, 10), (3, 8), (64, 8), (1, 1), (0, 4)] {
            let claims = Claims::new(n, runs);
            let taken: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        while let Some(r) = claims.take() {
                            assert!(!r.is_empty() && r.end <= n);
                            for u in r {
                                taken[u].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert!(
                taken.iter().all(|t| t.load(Ordering::Relaxed) == 1),
                "{n} in {runs}"
            );
        }
    }
}
