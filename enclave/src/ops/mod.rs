//! Kernels. Everything is float32, channels-last, row-major; the batch dimension is
//! the outermost one. Kernels assume the shapes were validated by `program` and
//! that they run inside the executor's rayon pool (so `rayon::join` and gemm's
//! `Parallelism::Rayon` use its persistent threads).

pub mod act;
pub mod binary;
pub mod conv;
pub mod dense;
pub mod misc;

pub use act::Act;

/// Run `f(i)` for `i in 0..n` on the current rayon pool, splitting by `rayon::join`
/// (no heap allocation, unlike `rayon::scope`).
pub fn par_for<F: Fn(usize) + Sync>(n: usize, f: &F) {
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

/// `gemm::Parallelism` for a thread count.
pub fn parallelism(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
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
