//! Dense layers / matrix products: `y[m, n] = x[m, k] · w[k, n] (+ bias[n])`.
//!
//! The kernel `w` is used exactly as stored (Keras `[in, out]`, row-major, row
//! stride `n`), straight from the decrypted container: no packed copy, so loading a
//! program touches no extra secret memory.
//!
//! * Batch 1 (GEMV, memory-bound) streams the kernel row by row: each thread owns a
//!   contiguous range of output columns, keeps that part of `y` in L1 and adds
//!   `x[i] · w[i, cols]` for several rows `i` per pass (every row chunk is one
//!   sequential read, so the hardware prefetchers and the TLB are happy).
//! * Larger batches use a register-blocked micro-kernel of up to `MR` rows × 32
//!   columns reading 32-column panels of `w` with row stride `n`, blocked over `k`
//!   (`KC` rows at a time) so a panel block is reused from cache by every row block.
//!   Panels are split across threads.
//!
//! Programs written by `ennclave split` store dense kernels pre-packed instead
//! (`kernel_layout: panels32`, see [`Kernel::Panels`]): the owner's machine does the
//! packing once, and the worker streams each panel contiguously at every batch size
//! with no copy at load or at run time. With more than one row block, each task first
//! packs a group of rows of `x` into scratch the executor plans (`pack_rows`), and
//! every panel of the task reads that packed block; a ReLU is applied as the kernels
//! store their last k-block. At batch 1 to 8 (AVX-512; batch 1 on AVX2) each panel is
//! read as four streams (`gemv_panel`), with accumulators of their own up to 3 rows and
//! shared sets beyond: at batch 1 eight independent FMA chains instead of two keep more
//! of the weights' loads in flight (the MIT67 head's 2048×2048 layer, 2 threads: 0.44 →
//! 0.30 ms; see `STREAM_MAX_ROWS` for more rows). For batches of more than one row, the
//! kernels prefetch the next panel block into L2 while computing one (batch 64 of the
//! benchmark head ran 10% faster with it on an AMD EPYC VM and 8% on an Intel Xeon VM;
//! at batch 1 it cost 20%). The row-major path above serves programs without that
//! attribute. Products with a small kernel and many rows (convolutions) run row block
//! by row block instead, see `rows_outer`.
//!
//! Three kernel families ([`Isa`]), chosen once per process by the CPU (or by
//! `ENNCLAVE_KERNEL=avx512|avx2|portable`, for tests and benchmarks):
//! * AVX-512: the 12×32 micro-kernel above, an AVX-512 GEMV, and gather kernels for
//!   convolutions of 12 pixels × 32 columns and 6 × 64 (a broadcast input feeds four
//!   FMAs: the image model's 3×3 convs at batch 64, one thread, 1.09–1.12× faster).
//! * AVX2+FMA (CPUs without AVX-512: Intel desktop CPUs since Alder Lake, AMD before
//!   Zen 4): 6×16 tiles of ymm accumulators (12 accumulators, 2 weight vectors and one
//!   broadcast fill 15 of the 16 registers) over each half of a 32-column panel, 2×32
//!   tiles for one or two rows, a 6-pixel × 16-column gather kernel for convolutions,
//!   and a streaming GEMV. Whole vectors are loaded and stored plainly, only a ragged
//!   last vector masked: on AMD a masked store is microcoded (the image model's CNN
//!   on an AMD EPYC VM (Zen 3), per layer at batch 64, 1 thread: conv3 5.0 → 3.3 ms
//!   from this alone).
//! * Portable (other CPUs): batches go to the `gemm` crate (its NEON kernels on ARM;
//!   its own dispatch on x86), batch 1 to a portable kernel that LLVM vectorises for
//!   the baseline target: memory-bound, it needs no more.

use super::{par_for, parallelism, SendPtr};

/// Columns per panel of the blocked kernel.
pub const NR: usize = 32;
/// Pixels per call of the AVX-512 gather kernel over a 64-column double panel
/// (6×4 accumulators + 4 weights + 1 broadcast of the 32 zmm registers).
pub(crate) const WIDE_ROWS: usize = 6;
/// Rows per AVX-512 micro-kernel call (12×2 accumulators + 2 weights + 1 broadcast
/// fit the 32 zmm registers).
const MR: usize = 12;
/// Rows per AVX2 micro-kernel call over a 16-column half panel (6×2 accumulators).
const MR_AVX2: usize = 6;
/// Up to this many rows, the AVX2 kernel covers a whole 32-column panel per call
/// (rows×4 accumulators): each weight row is then read once, as one stream.
const MR_AVX2_WIDE: usize = 2;
/// Rows per portable micro-kernel call.
const MR_PORTABLE: usize = 4;
/// Rows of `w` per k-block of the blocked kernel.
const KC: usize = 256;
/// Kernels of up to this many floats (256 KiB: they stay in L2) are multiplied row
/// block by row block (see [`rows_outer`]).
const SMALL_KERNEL: usize = 1 << 16;
/// With at least `TALL_ROWS` rows, kernels of up to `TALL_KERNEL` floats (1 MiB; this
/// Xeon's L2 is 2 MiB per core) run row block by row block too: split by panels, every
/// task packed all of `x` for its few panels. The MiniLM blocks' 384×384 projections at
/// 4096 rows, 2 threads: the 2-block part at batch 32 through the worker, alternating,
/// 171 → 161 ms. Fewer rows kept the panel split (the MIT67 head's 2048×67 layer at 32
/// rows was 3% slower by rows).
const TALL_ROWS: usize = 1024;
const TALL_KERNEL: usize = 1 << 18;
/// With more rows than this, the AVX-512 and AVX2 kernels prefetch the next panel
/// block into L2 while computing one. At batch 1 prefetching cost 20% on an AMD EPYC
/// VM (the hardware prefetcher already streams the panel); from 2 rows on it paid on
/// an Intel Xeon VM (batch 4 of the benchmark head, 1 thread: 1.00 → 0.85 ms with
/// AVX-512, 1.34 → 0.87 ms with AVX2).
const PF_MIN_ROWS: usize = 1;
/// Most rows of `x` packed at a time (see [`pack_rows`]), whole row blocks of both the
/// AVX-512 (12) and the AVX2 (6) kernels. With `KC` inputs each that is 96 KiB per
/// task, and the group's part of `y` (96 rows × the task's columns) stays in L2 while
/// every k-block adds to it. Batch 256 of a 2048×2048 layer, 2 threads, Intel Xeon VM:
/// 252 rows a group 9.9 ms, 96–144 rows 8.6–8.7 ms, 24 rows 9.8 ms.
const MB: usize = 8 * MR;
/// Packing needs at least this many panels per task (see `dense_with`).
const PACK_MIN_PANELS: usize = 4;
/// Rows of `w` added per pass of the GEMV kernel.
const GEMV_ROWS: usize = 8;
/// Up to this many rows, the AVX-512 kernels read each `panels32` panel as four
/// streams (`gemv_panel`), as at batch 1, instead of the blocked micro-kernel: 2048×2048
/// at 2 threads, Intel Xeon VM (`cargo run --release --example dense_layer -- M 2048
/// 2048 2`, one sitting): batch 2 0.48 → 0.375 ms, batch 3 0.47 → 0.40. From 4 rows on
/// four streams with accumulators of their own would take all 32 registers, so streams
/// share accumulator sets (two sets for 4–6 rows, one for 7–8): batch 4 0.49 → 0.39 ms
/// (against two streams of their own), batch 5 0.46–0.51 → 0.42, batch 8 0.52–0.54 →
/// 0.47–0.49 (against the blocked kernel); at 10 and 12 rows the blocked kernel is
/// faster.
const STREAM_MAX_ROWS: usize = 8;

/// A dense kernel (`k` inputs × `n` outputs) in one of the two layouts a program may
/// store it in.
#[derive(Clone, Copy)]
pub enum Kernel<'a> {
    /// Keras `[in, out]`, row-major (row stride `n`).
    Rows(&'a [f32]),
    /// `panels32`: `[ceil(n/32), k, 32]`, see [`pack_panels`].
    Panels(&'a [f32]),
}

/// `y = x · w + bias`. `x` is `m × k`, `y` is `m × n`, both row-major.
///
/// With [`Kernel::Panels`] each thread owns a range of panels; for each panel, `KC`-row
/// blocks of it (32 KiB, contiguous) are reused from L1 by every block of up to `MR`
/// rows of `x`. At batch 1 this is a sequential read of every panel, which is what a
/// memory-bound GEMV wants. With [`Kernel::Rows`] the same micro-kernel reads panel
/// blocks with row stride `n`, and batch 1 uses the row-streaming GEMV.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    x: &[f32],
    w: Kernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    dense_with(isa(), x, w, bias, y, m, k, n, threads, &mut [], false)
}

/// Floats of scratch with which [`dense_scratch`] packs the rows of `x` for `m` rows
/// and `threads` threads (0 when it would not pack).
pub fn scratch_len(m: usize, threads: usize) -> usize {
    pack_len(isa(), m) * threads.max(1)
}

/// [`dense`], packing blocks of `x` into `scratch` (≥ [`scratch_len`] floats) for
/// `panels32` kernels and more than one row block (see `pack_rows`), and with
/// `relu`, `y = max(y, 0)` ([`Act::Relu`](super::Act::Relu) exactly), done by the
/// micro-kernels as they store their last k-block instead of in a pass over `y`.
#[allow(clippy::too_many_arguments)]
pub fn dense_scratch(
    x: &[f32],
    w: Kernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    scratch: &mut [f32],
    relu: bool,
) {
    dense_with(isa(), x, w, bias, y, m, k, n, threads, scratch, relu)
}

/// Floats one task packs `m` rows into (see [`pack_rows`]): up to `MB` rows, rounded up
/// to whole row blocks, × `KC`; 0 for one row block or the portable kernels.
fn pack_len(isa: Isa, m: usize) -> usize {
    if isa == Isa::Portable || m <= isa.rows() {
        return 0;
    }
    group_rows(isa, m) * KC
}

/// Whether [`dense_with`] packs `m` rows for `np` panels on `parts` tasks (given the
/// scratch): more than one row block, and every task with a few panels to read them.
fn packs_rows(isa: Isa, m: usize, np: usize, parts: usize) -> bool {
    pack_len(isa, m) > 0 && np >= PACK_MIN_PANELS * parts
}

/// Rows per packed group: `m` cut into equal groups of at most `MB` rows, rounded up
/// to whole row blocks.
fn group_rows(isa: Isa, m: usize) -> usize {
    m.div_ceil(m.div_ceil(MB).max(1))
        .next_multiple_of(isa.rows())
}

/// [`dense`] with the given kernel family (tests run every one the CPU has).
#[allow(clippy::too_many_arguments)]
fn dense_with(
    isa: Isa,
    x: &[f32],
    w: Kernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    scratch: &mut [f32],
    relu: bool,
) {
    let np = n.div_ceil(NR);
    let w_ok = match w {
        Kernel::Rows(w) => w.len() >= k * n,
        Kernel::Panels(wp) => wp.len() >= np * k * NR,
    };
    assert!(x.len() >= m * k && y.len() >= m * n && w_ok);
    assert!(bias.is_none_or(|b| b.len() >= n));
    // The paths whose kernels do not apply the ReLU themselves.
    let relu_after = |y: &mut [f32]| {
        if relu {
            super::Act::Relu.apply(&mut y[..m * n]);
        }
    };
    if degenerate(bias, y, m, k, n) {
        relu_after(y);
        return;
    }
    if let (Kernel::Rows(w), 1) = (w, m) {
        gemv(isa, &x[..k], w, bias, &mut y[..n], k, n, threads);
        relu_after(y);
        return;
    }
    if isa == Isa::Portable && m > 1 {
        // On other CPUs, batches go to the gemm crate's kernels (NEON on ARM): the
        // portable kernel reached 40% of their speed at batch 64.
        with_gemm(x, w, bias, y, m, k, n, threads);
        relu_after(y);
        return;
    }
    // A few panels that do not split evenly between the threads (a classifier's last
    // layer: 67 columns are 3 panels, 1 + 2 between two threads): tasks own rows
    // instead. (Each row block then reads the whole kernel from L2, which lost where the
    // panels do split evenly: 3136 → 128 at batch 64, 2 threads, 0.53 against 0.26–0.40
    // ms by panels.)
    let few_panels =
        np < 4 * threads && !np.is_multiple_of(threads) && m >= 2 * isa.rows() * threads;
    let tall = m >= TALL_ROWS && k * n <= TALL_KERNEL;
    if m > isa.rows() && (k * n <= SMALL_KERNEL || tall || few_panels) {
        rows_outer(isa, x, w, bias, y, m, k, n, threads, relu);
        return;
    }
    let parts = panel_tasks(threads, np, k);
    let per = pack_len(isa, m);
    let gsz = group_rows(isa, m);
    let packed = packs_rows(isa, m, np, parts) && scratch.len() >= per * parts;
    let yp = SendPtr(y.as_mut_ptr());
    let sp = SendPtr(scratch.as_mut_ptr());
    // SAFETY (all arms): columns c0..c0+ncols of y belong to this task alone (panels
    // are split between tasks); all tasks end before our borrow of y does.
    match w {
        Kernel::Panels(wp) if packed => par_for(parts, &|t| {
            // SAFETY: scratch holds parts × per floats (checked above); this range is
            // task t's alone, and the borrow of scratch outlives every task.
            let ap = unsafe { std::slice::from_raw_parts_mut(sp.get().add(t * per), per) };
            let (p0, p1) = (np * t / parts, np * (t + 1) / parts);
            for g0 in (0..m).step_by(gsz) {
                let gm = gsz.min(m - g0);
                // SAFETY: rows g0..g0+gm of y (m × n) lie inside it.
                let yg = SendPtr(unsafe { yp.get().add(g0 * n) });
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    pack_rows(&x[g0 * k..(g0 + gm) * k], k, gm, k0, kc, isa.rows(), ap);
                    for p in p0..p1 {
                        let c0 = p * NR;
                        let ncols = NR.min(n - c0);
                        let init = block_init(bias, k0, c0, ncols);
                        let at =
                            |p: usize, k0: usize, kc: usize| &wp[(p * k + k0) * NR..][..kc * NR];
                        let wb = at(p, k0, kc);
                        // The block computed next, prefetched while this one computes:
                        // this k-block of the next panel, or the next k-block of the
                        // task's first panel.
                        let next = if p + 1 < p1 {
                            at(p + 1, k0, kc)
                        } else if k0 + kc < k {
                            at(p0, k0 + kc, KC.min(k - k0 - kc))
                        } else {
                            &[]
                        };
                        // SAFETY: see above the match.
                        unsafe {
                            let xr = XRows::Packed(ap);
                            let last = relu && k0 + kc == k;
                            row_blocks(
                                isa, xr, gm, k0, kc, wb, NR, next, init, yg, n, c0, ncols, last,
                            )
                        };
                    }
                    k0 += kc;
                }
            }
        }),
        Kernel::Rows(w) => par_for(parts, &|t| {
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                for p in np * t / parts..np * (t + 1) / parts {
                    let c0 = p * NR;
                    let ncols = NR.min(n - c0);
                    let init = block_init(bias, k0, c0, ncols);
                    // The panel block: rows k0..k0+kc, columns c0..c0+ncols of w.
                    let wb = &w[k0 * n + c0..(k0 + kc - 1) * n + c0 + ncols];
                    // SAFETY: see above the match.
                    unsafe {
                        let xr = XRows::Strided(x, k);
                        let last = relu && k0 + kc == k;
                        row_blocks(isa, xr, m, k0, kc, wb, n, &[], init, yp, n, c0, ncols, last)
                    };
                }
                k0 += kc;
            }
        }),
        Kernel::Panels(wp) => par_for(parts, &|t| {
            for p in np * t / parts..np * (t + 1) / parts {
                let c0 = p * NR;
                let ncols = NR.min(n - c0);
                let panel = &wp[p * k * NR..(p + 1) * k * NR];
                #[cfg(target_arch = "x86_64")]
                if streams_panels(isa, m) {
                    let b = bias.map(|b| &b[c0..c0 + ncols]);
                    // SAFETY: columns c0..c0+ncols of y's m rows are this task's (see
                    // above the match); the panel holds k rows of 32 floats (padded).
                    unsafe {
                        gemv_panel(
                            isa,
                            &x[..m * k],
                            m,
                            panel,
                            b,
                            yp.get().add(c0),
                            n,
                            ncols,
                            relu,
                        )
                    };
                    continue;
                }
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    let init = block_init(bias, k0, c0, ncols);
                    let wb = &panel[k0 * NR..(k0 + kc) * NR];
                    // The block computed next (the rest of this panel, then the next
                    // panel of this task: panels are contiguous), prefetched while this
                    // one computes; not at batch 1 (see PF_MIN_ROWS).
                    let next_at = p * k * NR + (k0 + kc) * NR;
                    let next_end = if m <= PF_MIN_ROWS {
                        next_at
                    } else if k0 + kc < k {
                        next_at + KC.min(k - k0 - kc) * NR
                    } else if p + 1 < np * (t + 1) / parts {
                        next_at + KC.min(k) * NR
                    } else {
                        next_at
                    };
                    let next = &wp[next_at..next_end];
                    // SAFETY: see above the match.
                    unsafe {
                        let xr = XRows::Strided(x, k);
                        let last = relu && k0 + kc == k;
                        row_blocks(
                            isa, xr, m, k0, kc, wb, NR, next, init, yp, n, c0, ncols, last,
                        )
                    };
                    k0 += kc;
                }
            }
        }),
    }
}

/// Whether [`gemv_panel`] runs `m` rows on the kernel family `isa`.
fn streams_panels(isa: Isa, m: usize) -> bool {
    match isa {
        Isa::Avx512 => m <= STREAM_MAX_ROWS,
        Isa::Avx2 => m == 1,
        Isa::Portable => false,
    }
}

/// Small batches ([`streams_panels`]) on one `panels32` panel: `y[r, ..ncols] = x[r] ·
/// panel + bias` for the `m` rows of `x` (`k` floats each, `ldy` apart in `y`), then
/// `max(y, 0)` with `relu`; the panel read as four streams (its k rows cut into that
/// many ranges, each adding into accumulators of its own up to 3 rows and into shared
/// sets from 4 rows on, see `STREAM_MAX_ROWS`; summed at the end). With one
/// range a row's two accumulators are two FMA dependency chains, and the loads queued
/// behind them keep too few cache misses in flight: `cargo run --release --example
/// stream_bandwidth` reads a 21 MB buffer at 20 GB/s per core with one add chain and
/// 26–27 GB/s with two or more (Intel Xeon VM; 41 → 54 GB/s on two cores), and the
/// 2048×2048 layer of the MIT67 head took 0.44 ms on two threads with one range, 0.30
/// ms with four.
///
/// # Safety
/// The CPU must have the ISA (not `Portable`); `y + r·ldy` must be valid for writes of
/// `ncols` ≤ 32 floats that nobody else accesses during the call, for every row `r`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
unsafe fn gemv_panel(
    isa: Isa,
    x: &[f32],
    m: usize,
    panel: &[f32],
    bias: Option<&[f32]>,
    y: *mut f32,
    ldy: usize,
    ncols: usize,
    relu: bool,
) {
    assert!(streams_panels(isa, m) && m >= 1 && x.len().is_multiple_of(m));
    let k = x.len() / m;
    assert!(panel.len() >= k * NR && (1..=NR).contains(&ncols) && ldy >= ncols);
    assert!(bias.is_none_or(|b| b.len() >= ncols));
    let (x, w) = (x.as_ptr(), panel.as_ptr());
    // SAFETY: the CPU has the ISA (caller); x holds m rows of k floats, the panel k
    // rows of 32, bias ≥ ncols floats, y m rows of ncols writable floats (caller).
    unsafe {
        match (isa, m) {
            (Isa::Avx512, 1) => avx512::gemv_panel::<1, 4>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, 2) => avx512::gemv_panel::<2, 4>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, 3) => avx512::gemv_panel::<3, 4>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, 4) => avx512::gemv_panel::<4, 2>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, 5) => avx512::gemv_panel::<5, 2>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, 6) => avx512::gemv_panel::<6, 2>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, 7) => avx512::gemv_panel::<7, 1>(x, k, w, bias, y, ldy, ncols, relu),
            (Isa::Avx512, _) => avx512::gemv_panel::<8, 1>(x, k, w, bias, y, ldy, ncols, relu),
            _ => {
                avx2::gemv_panel(std::slice::from_raw_parts(x, k), w, bias, y, ncols);
                if relu {
                    super::Act::Relu.apply(std::slice::from_raw_parts_mut(y, ncols));
                }
            }
        }
    }
}

/// Tall and narrow products (convolutions: many pixels, a small kernel) whose whole
/// kernel fits in L2: each block of rows goes through every panel and k-block while
/// its rows of `x` stay in L1. The panel-outer order of [`dense_with`] would stream `x`
/// (the im2col matrix, megabytes) from memory once per panel and k-block instead.
/// Tasks own ranges of row blocks.
#[allow(clippy::too_many_arguments)]
fn rows_outer(
    isa: Isa,
    x: &[f32],
    w: Kernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    relu: bool,
) {
    let step = isa.rows();
    let blocks = m.div_ceil(step);
    // ≥ 4 row blocks per task, to amortise the fork.
    let parts = threads.clamp(1, blocks.div_ceil(4));
    let yp = SendPtr(y.as_mut_ptr());
    par_for(parts, &|t| {
        for b in blocks * t / parts..blocks * (t + 1) / parts {
            let r0 = b * step;
            let rows = step.min(m - r0);
            let xs = &x[r0 * k..(r0 + rows) * k];
            // SAFETY: rows r0..r0+rows of y (m × n, asserted by `dense_with`) belong
            // to this task alone; all tasks end before our borrow of y does.
            let yb = SendPtr(unsafe { yp.get().add(r0 * n) });
            for p in 0..n.div_ceil(NR) {
                let c0 = p * NR;
                let ncols = NR.min(n - c0);
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    let init = block_init(bias, k0, c0, ncols);
                    let (wb, ldw) = match w {
                        Kernel::Rows(w) => (&w[k0 * n + c0..], n),
                        Kernel::Panels(wp) => (&wp[(p * k + k0) * NR..], NR),
                    };
                    // SAFETY: yb points at `rows` rows of n floats that are ours (above).
                    unsafe {
                        row_blocks(
                            isa,
                            XRows::Strided(xs, k),
                            rows,
                            k0,
                            kc,
                            wb,
                            ldw,
                            &[],
                            init,
                            yb,
                            n,
                            c0,
                            ncols,
                            relu && k0 + kc == k,
                        )
                    };
                    k0 += kc;
                }
            }
        }
    });
}

/// How many tasks share `np` panels of `k` rows: at most `threads`, with enough panels
/// each to amortise the fork (≥ ~64 KiB of weights).
fn panel_tasks(threads: usize, np: usize, k: usize) -> usize {
    let min_panels = (16384 / (k * NR)).max(1);
    threads.clamp(1, np.div_ceil(min_panels).max(1))
}

/// `y = x · w + bias` with the gemm crate: one call for a row-major kernel (the crate
/// splits it between threads), one per panel for `panels32` (tasks own panel ranges).
#[allow(clippy::too_many_arguments)]
fn with_gemm(
    x: &[f32],
    w: Kernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    // gemm computes dst = dst + x·w here, so y starts as the bias (or zero).
    for row in y[..m * n].chunks_exact_mut(n) {
        match bias {
            Some(b) => row.copy_from_slice(&b[..n]),
            None => row.fill(0.0),
        }
    }
    let yp = SendPtr(y.as_mut_ptr());
    match w {
        // SAFETY: x is m×k (row stride k), w is k×n (row stride n) and y is m×n (row
        // stride n), all asserted by `dense_with`; y is an exclusive borrow, so it aliases
        // neither x nor w.
        Kernel::Rows(w) => unsafe {
            gemm_block(
                yp.get(),
                n,
                x,
                k,
                w.as_ptr(),
                n,
                m,
                n,
                k,
                parallelism(threads),
            )
        },
        Kernel::Panels(wp) => {
            let np = n.div_ceil(NR);
            let parts = panel_tasks(threads, np, k);
            par_for(parts, &|t| {
                for p in np * t / parts..np * (t + 1) / parts {
                    let c0 = p * NR;
                    // SAFETY: panel p is k×32 (row stride 32) inside wp (asserted by
                    // `dense_with`); the panel's columns of y's m rows belong to this
                    // task alone, and every task ends before our borrow of y does.
                    unsafe {
                        gemm_block(
                            yp.get().add(c0),
                            n,
                            x,
                            k,
                            wp[p * k * NR..].as_ptr(),
                            NR,
                            m,
                            NR.min(n - c0),
                            k,
                            gemm::Parallelism::None,
                        )
                    }
                }
            })
        }
    }
}

/// `y[m × cols] += x[m × k] · w[k × cols]` with the gemm crate; all row-major with the
/// given row strides.
///
/// # Safety
/// `y`, `x` and `w` must be valid for those shapes and strides, and `y` must not
/// overlap `x`, `w` or anything another thread touches during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    y: *mut f32,
    ldy: usize,
    x: &[f32],
    ldx: usize,
    w: *const f32,
    ldw: usize,
    m: usize,
    cols: usize,
    k: usize,
    par: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; gemm reads x and w and writes y within those
    // shapes and strides.
    unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            y,
            1,
            ldy as isize,
            true,
            x.as_ptr(),
            1,
            ldx as isize,
            w,
            1,
            ldw as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

/// Pack a row-major `k × n` kernel into the `panels32` layout: `[ceil(n/32), k, 32]`,
/// panel `p` holding columns `32p..32p+32` row by row, the last panel zero-padded.
/// (The owner side does this in Python; this copy is for tests and examples.)
pub fn pack_panels(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let np = n.div_ceil(NR);
    let mut out = vec![0.0f32; np * k * NR];
    if k == 0 {
        return out;
    }
    for (p, panel) in out.chunks_exact_mut(k * NR).enumerate() {
        let c0 = p * NR;
        let ncols = NR.min(n - c0);
        for (i, row) in panel.chunks_exact_mut(NR).enumerate() {
            row[..ncols].copy_from_slice(&w[i * n + c0..i * n + c0 + ncols]);
        }
    }
    out
}

/// Copy columns `k0..k0+kc` of the `rows` rows of `x` (`ldx` apart) into `ap` as
/// blocks of `step` rows, block `b` at `ap[b·step·kc ..]` holding input `i` of its row
/// `r` at `i·step + r`. The micro-kernel then reads a block through one pointer, in
/// one sequential range, instead of `step` rows a whole row of `x` apart (which also
/// costs the kernel address arithmetic: 158 → 174 GFLOP/s for the AVX-512 kernel alone,
/// all in L1). A 2048×2048 layer at batch 256, 2 threads, Intel Xeon VM, one sitting
/// (`cargo run --release --example dense_layer -- 256 2048 2048 2`): 10.1–10.4 →
/// 8.6–8.8 ms with AVX-512, 15.0–15.8 → 12.4–12.6 ms with AVX2.
fn pack_rows(
    x: &[f32],
    ldx: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    step: usize,
    ap: &mut [f32],
) {
    assert!(ap.len() >= rows.next_multiple_of(step) * kc && x.len() >= (rows - 1) * ldx + k0 + kc);
    for (b, blk) in ap
        .chunks_mut(step * kc)
        .take(rows.div_ceil(step))
        .enumerate()
    {
        for r in 0..step.min(rows - b * step) {
            let xr = &x[(b * step + r) * ldx + k0..][..kc];
            for (d, &v) in blk[r..].iter_mut().step_by(step).zip(xr) {
                *d = v;
            }
        }
    }
}

/// Handle the shapes with nothing to multiply (no rows, no columns, or `k == 0`,
/// where `y` is just the bias); false when there is real work.
fn degenerate(bias: Option<&[f32]>, y: &mut [f32], m: usize, k: usize, n: usize) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k > 0 {
        return false;
    }
    for row in y[..m * n].chunks_exact_mut(n) {
        match bias {
            Some(b) => row.copy_from_slice(&b[..n]),
            None => row.fill(0.0),
        }
    }
    true
}

/// Multiply every block of rows of `x` (columns `k0..k0+kc`) by one panel block `wb`
/// (`kc` rows `ldw` apart, `ncols` ≤ 32 columns) into columns `c0..c0+ncols` of `y`
/// (`m × n`, at `yp`). `next` is the weight block computed after this one
/// (contiguous, or empty): it is prefetched meanwhile, a share per micro-kernel call.
///
/// Row blocks are of [`Isa::rows`] rows. The AVX2 kernel, for more than
/// `MR_AVX2_WIDE` rows, covers one 16-column half of the panel per call, every row
/// block of the first half before the second (each half block, 16 KiB at `KC`, stays
/// in L1 for all of them).
///
/// # Safety
/// `yp` must point at `m × n` floats, and columns `c0..c0+ncols` of every row must not
/// be read or written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn row_blocks(
    isa: Isa,
    x: XRows<'_>,
    m: usize,
    k0: usize,
    kc: usize,
    wb: &[f32],
    ldw: usize,
    next: &[f32],
    init: Init,
    yp: SendPtr,
    n: usize,
    c0: usize,
    ncols: usize,
    relu: bool,
) {
    let step = isa.rows();
    let half = if isa == Isa::Avx2 && m > MR_AVX2_WIDE {
        NR / 2
    } else {
        NR
    };
    let parts = ncols.div_ceil(half);
    let calls = m.div_ceil(step) * parts;
    let mut call = 0;
    for h in 0..parts {
        let hc = h * half;
        let hn = half.min(ncols - hc);
        let init = match init {
            Init::Bias(b) => Init::Bias(&b[hc..hc + hn]),
            other => other,
        };
        let mut r0 = 0;
        while r0 < m {
            let rows = step.min(m - r0);
            // Each call prefetches its share of the next weight block into L2, so that
            // block streams in while this one computes instead of stalling the first
            // row block that reads it.
            let pf = &next[next.len() * call / calls..next.len() * (call + 1) / calls];
            call += 1;
            let xs = match x {
                XRows::Strided(x, k) => {
                    XRows::Strided(&x[r0 * k + k0..(r0 + rows - 1) * k + k0 + kc], k)
                }
                // Row block r0 / step of the packed k-block (see `pack_rows`).
                XRows::Packed(ap) => XRows::Packed(&ap[r0 * kc..r0 * kc + (kc - 1) * step + rows]),
            };
            // SAFETY: rows r0..r0+rows, columns c0+hc..c0+hc+hn lie inside y (caller's
            // contract: m × n at yp) and are ours alone for the call.
            unsafe {
                micro(
                    isa,
                    rows,
                    xs,
                    kc,
                    &wb[hc..],
                    ldw,
                    pf,
                    init,
                    yp.get().add(r0 * n + c0 + hc),
                    n,
                    hn,
                    relu,
                )
            };
            r0 += rows;
        }
    }
}

/// `y[rows × n] = x · w + bias` (or `+=` with `accumulate`) for `rows` rows of `x`
/// that are `ldx` floats apart and `kc` long, and a row-major `kc × n` kernel `w`
/// (row stride `ldw` ≥ `n`), with the micro-kernels of `isa`. The rows may overlap: a
/// convolution passes the windows of consecutive output pixels straight from its
/// (padded) input this way, see `conv::direct`.
///
/// # Safety
/// `y` must point at `rows` rows of `n` floats, `ldy` apart, that nobody else reads or
/// writes during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn strided_rows(
    isa: Isa,
    x: &[f32],
    rows: usize,
    ldx: usize,
    kc: usize,
    w: &[f32],
    ldw: usize,
    n: usize,
    bias: Option<&[f32]>,
    accumulate: bool,
    y: *mut f32,
    ldy: usize,
) {
    assert!(rows >= 1 && kc >= 1 && n >= 1 && x.len() >= (rows - 1) * ldx + kc);
    assert!(ldw >= n && w.len() >= (kc - 1) * ldw + n);
    assert!(ldy >= n && bias.is_none_or(|b| b.len() >= n));
    for c0 in (0..n).step_by(NR) {
        let ncols = NR.min(n - c0);
        let init = if accumulate {
            Init::Accumulate
        } else {
            block_init(bias, 0, c0, ncols)
        };
        // SAFETY: rows × columns c0..c0+ncols of y are the caller's to write (its
        // contract), x and w hold the rows asserted above.
        unsafe {
            row_blocks(
                isa,
                XRows::Strided(x, ldx),
                rows,
                0,
                kc,
                &w[c0..],
                ldw,
                &[],
                init,
                SendPtr(y),
                ldy,
                c0,
                ncols,
                false,
            )
        };
    }
}

/// Whether [`gather_rows`] runs on this kernel family (AVX-512 and AVX2).
pub(crate) fn has_gather(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa != Isa::Portable
}

/// Up to [`Isa::rows`] output pixels of a convolution: `y[r, 0..ncols] = bias +
/// Σ_s rows[r][segs[s] .. + seg] · w[s·seg .., 0..ncols]` (`w` row stride `ldw`), row
/// `r` of `y` at `y + r·ldy`, then `max(y, 0)` with `relu` ([`Act::Relu`](super::Act)
/// exactly). Only where [`has_gather`]. `ncols ≤ NR`, or on AVX-512 a double panel
/// (`ncols ≤ 2·NR`) of up to [`WIDE_ROWS`] pixels.
///
/// # Safety
/// `rows[r] + segs[s] .. + seg` must be valid for reads for every row and segment,
/// and `y + r·ldy .. + ncols` for writes (and touched by nobody else) for every row.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gather_rows(
    rows: &[*const f32],
    segs: &[usize],
    seg: usize,
    w: &[f32],
    ldw: usize,
    ncols: usize,
    bias: Option<&[f32]>,
    y: *mut f32,
    ldy: usize,
    relu: bool,
) {
    let isa = isa();
    let wide = ncols > NR;
    assert!(
        (1..=isa.rows()).contains(&rows.len()) && (1..=NR).contains(&ncols)
            || wide
                && isa == Isa::Avx512
                && (1..=WIDE_ROWS).contains(&rows.len())
                && ncols <= 2 * NR
    );
    assert!(seg >= 1);
    assert!(!segs.is_empty() && w.len() >= (segs.len() * seg - 1) * ldw + ncols);
    assert!(bias.is_none_or(|b| b.len() >= ncols));
    #[cfg(target_arch = "x86_64")]
    {
        assert!(has_gather(isa));
        let w = w.as_ptr();
        macro_rules! go {
            ($isa:ident::$f:ident, $w:expr, $bias:expr, $y:expr, $nc:expr; $($r:literal)*) => {
                match rows.len() {
                    // SAFETY: the CPU has the ISA (`has_gather`, `isa()`; a double
                    // panel only on AVX-512, asserted above); the caller's contract
                    // for rows and y, w's length asserted above.
                    $($r => unsafe {
                        $isa::$f::<$r>(rows, segs, seg, $w, ldw, $bias, $y, ldy, $nc, relu)
                    },)*
                    _ => unreachable!("rows <= isa.rows()"),
                }
            };
        }
        if wide {
            go!(avx512::gather_kernel_wide, w, bias, y, ncols; 1 2 3 4 5 6);
        } else if isa == Isa::Avx512 {
            go!(avx512::gather_kernel, w, bias, y, ncols; 1 2 3 4 5 6 7 8 9 10 11 12);
        } else {
            // AVX2: each 16-column half of the panel in turn (6 pixels × 2 ymm
            // accumulators fill 12 of the 16 registers, as in the dense kernel).
            for hc in (0..ncols).step_by(NR / 2) {
                let nc = (NR / 2).min(ncols - hc);
                // SAFETY: columns hc..hc+nc are inside the caller's 0..ncols of w, bias
                // and y (the offsets stay inside them).
                let (wh, yh) = unsafe { (w.add(hc), y.add(hc)) };
                let bh = bias.map(|b| &b[hc..]);
                go!(avx2::gather_kernel, wh, bh, yh, nc; 1 2 3 4 5 6);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, segs, seg, w, ldw, ncols, bias, y, ldy, relu);
        unreachable!("has_gather is false here");
    }
}

/// How the block at `(k0, c0)` starts: the bias (or zero) on the first k-block,
/// else the partial sums already in `y`.
fn block_init(bias: Option<&[f32]>, k0: usize, c0: usize, ncols: usize) -> Init<'_> {
    if k0 == 0 {
        bias.map_or(Init::Zero, |b| Init::Bias(&b[c0..c0 + ncols]))
    } else {
        Init::Accumulate
    }
}

/// The rows of `x` a micro-kernel call reads.
#[derive(Clone, Copy)]
enum XRows<'a> {
    /// Row `r`'s inputs at `x[r * ldx ..]`.
    Strided(&'a [f32], usize),
    /// Input `i` of row `r` at `x[i * isa.rows() + r]` (see [`pack_rows`]): one
    /// pointer walks them, and they stream from one sequential range.
    Packed(&'a [f32]),
}

/// How a micro-kernel call starts its accumulators.
#[derive(Clone, Copy)]
enum Init<'a> {
    Zero,
    Bias(&'a [f32]),
    /// From the values already in `y` (a later k-block).
    Accumulate,
}

/// Batch 1: `y[n] = x[k] · w[k × n] + bias`.
#[allow(clippy::too_many_arguments)]
fn gemv(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    k: usize,
    n: usize,
    t: usize,
) {
    // Column chunks: multiples of 16 floats, ≥ ~64 KiB of weights per task.
    let min_cols = (16384 / k).max(64);
    let parts = t.clamp(1, n.div_ceil(min_cols).max(1));
    let yp = SendPtr(y.as_mut_ptr());
    par_for(parts, &|p| {
        let c0 = (n * p / parts) / 16 * 16;
        let c1 = if p + 1 == parts {
            n
        } else {
            (n * (p + 1) / parts) / 16 * 16
        };
        if c1 <= c0 {
            return;
        }
        // SAFETY: columns c0..c1 of y belong to this task alone (the chunks are
        // disjoint); all tasks end before `gemv`'s borrow of y does.
        let yc = unsafe { std::slice::from_raw_parts_mut(yp.get().add(c0), c1 - c0) };
        match bias {
            Some(b) => yc.copy_from_slice(&b[c0..c1]),
            None => yc.fill(0.0),
        }
        gemv_cols(isa, x, w, yc, k, n, c0);
    });
}

/// `yc += x · w[.., c0..c0 + yc.len()]`, `GEMV_ROWS` rows of `w` per pass over `yc`.
fn gemv_cols(isa: Isa, x: &[f32], w: &[f32], yc: &mut [f32], k: usize, n: usize, c0: usize) {
    let len = yc.len();
    debug_assert!(c0 + len <= n && w.len() >= k * n && x.len() >= k);
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let avx512 = isa == Isa::Avx512;
        let mut i = 0;
        while i < k {
            let r = if i + GEMV_ROWS <= k { GEMV_ROWS } else { 1 };
            let (yp, wp, xs) = (yc.as_mut_ptr(), w[i * n + c0..].as_ptr(), &x[i..i + r]);
            // SAFETY: the CPU has the ISA (`isa()` checked it); rows i..i+r ≤ k of w
            // have ≥ c0+len columns (row stride n ≥ c0+len), and yc holds len floats.
            unsafe {
                match (avx512, r) {
                    (true, GEMV_ROWS) => avx512::axpy_rows::<GEMV_ROWS>(yp, wp, n, xs, len),
                    (true, _) => avx512::axpy_rows::<1>(yp, wp, n, xs, len),
                    (false, GEMV_ROWS) => avx2::axpy_rows::<GEMV_ROWS>(yp, wp, n, xs, len),
                    (false, _) => avx2::axpy_rows::<1>(yp, wp, n, xs, len),
                }
            };
            i += r;
        }
        return;
    }
    let _ = isa;
    axpy_portable(x, w, yc, k, n, c0);
}

#[inline(always)]
fn axpy_portable(x: &[f32], w: &[f32], yc: &mut [f32], k: usize, n: usize, c0: usize) {
    let len = yc.len();
    let mut i = 0;
    while i + 4 <= k {
        let r0 = &w[i * n + c0..][..len];
        let r1 = &w[(i + 1) * n + c0..][..len];
        let r2 = &w[(i + 2) * n + c0..][..len];
        let r3 = &w[(i + 3) * n + c0..][..len];
        let (x0, x1, x2, x3) = (x[i], x[i + 1], x[i + 2], x[i + 3]);
        for j in 0..len {
            yc[j] += x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j];
        }
        i += 4;
    }
    while i < k {
        let r = &w[i * n + c0..][..len];
        let xi = x[i];
        for (a, &b) in yc.iter_mut().zip(r) {
            *a += xi * b;
        }
        i += 1;
    }
}

/// The fp32 kernel family this process runs: the best the CPU has, or the one
/// `ENNCLAVE_KERNEL=avx512|avx2|portable` asks for (`ENNCLAVE_NO_AVX512=1`, the older
/// switch, means at most `avx2`), so tests and benchmarks can run every path on one
/// machine. A family the CPU lacks falls back to the next one down. Decided once,
/// during the executor's warm-up, before the sandbox goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// Whether this CPU can run the family.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The name `ENNCLAVE_KERNEL` uses.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The family for these switch values on this CPU.
    fn choose(kernel: Option<&str>, no_avx512: bool) -> Isa {
        let want = Isa::ALL
            .into_iter()
            .find(|i| Some(i.name()) == kernel)
            .unwrap_or(Isa::Avx512);
        let want = if no_avx512 { want.max(Isa::Avx2) } else { want };
        Isa::ALL
            .into_iter()
            .find(|i| *i >= want && i.supported())
            .unwrap_or(Isa::Portable)
    }

    /// Rows per micro-kernel call.
    pub(crate) fn rows(self) -> usize {
        match self {
            Isa::Avx512 => MR,
            Isa::Avx2 => MR_AVX2,
            Isa::Portable => MR_PORTABLE,
        }
    }
}

/// The kernel family in use (see [`Isa`]).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let kernel = std::env::var("ENNCLAVE_KERNEL").ok();
        let no_avx512 = std::env::var_os("ENNCLAVE_NO_AVX512").is_some_and(|v| v == "1");
        Isa::choose(kernel.as_deref(), no_avx512)
    })
}

/// Whether the AVX-512 kernels run.
pub fn has_avx512() -> bool {
    isa() == Isa::Avx512
}

/// One block of `rows` rows × one panel block (`kc` rows of `w`, `ncols` ≤ 32
/// columns, row stride `ldw`). `x` holds the rows' `kc` inputs, `ldx` apart. `y`
/// points at the block's first element; its rows are `ldy` apart. The AVX-512 and AVX2
/// kernels prefetch up to `kc` cache lines of `prefetch` into L2 on the way.
///
/// # Safety
/// `y + r*ldy .. + ncols` must be valid for reads and writes for every `r < rows`,
/// and not aliased by any live reference; `rows <= isa.rows()`, and for AVX2
/// `ncols <= 16` unless `rows <= MR_AVX2_WIDE`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    isa: Isa,
    rows: usize,
    x: XRows<'_>,
    kc: usize,
    w: &[f32],
    ldw: usize,
    prefetch: &[f32],
    init: Init,
    y: *mut f32,
    ldy: usize,
    ncols: usize,
    relu: bool,
) {
    debug_assert!(rows >= 1 && kc >= 1 && (1..=NR).contains(&ncols));
    debug_assert!(w.len() >= (kc - 1) * ldw + ncols);
    let (x, ldx, packed) = match x {
        XRows::Strided(x, ldx) => {
            debug_assert!(x.len() >= (rows - 1) * ldx + kc);
            (x, ldx, false)
        }
        XRows::Packed(x) => {
            assert!(isa != Isa::Portable && x.len() >= (kc - 1) * isa.rows() + rows);
            (x, 0, true)
        }
    };
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let bias = match init {
            Init::Bias(b) => Some(b),
            _ => None,
        };
        let acc = matches!(init, Init::Accumulate);
        let (x, w) = (x.as_ptr(), w.as_ptr());
        // `kernel::<R, C, P>` of the `isa` module for `rows` R. AVX-512: C vectors per
        // row (a panel of at most 16 columns, the last of a layer, needs one); AVX2: C
        // ymm per row, 4 (a whole 32-column panel, for 1 or 2 rows) or 2 (a 16-column
        // half); P: x strided (0) or packed by that many rows (see `pack_rows`).
        macro_rules! go {
            ($isa:ident, $c:literal, $p:expr; $($r:literal)*) => {
                match rows {
                    // SAFETY: the CPU has the ISA (checked by `isa()`); x holds `rows`
                    // rows of kc floats ldx apart (or packed), w kc rows of ncols
                    // floats ldw apart, bias ≥ ncols floats, and y has `rows` rows of
                    // ≥ ncols readable and writable floats `ldy` apart.
                    $($r => unsafe {
                        $isa::kernel::<$r, $c, $p>(
                            x, ldx, kc, w, ldw, prefetch, bias, acc, y, ldy, ncols, relu,
                        )
                    },)*
                    _ => unreachable!("rows <= isa.rows()"),
                }
            };
        }
        let half = ncols <= NR / 2;
        match (isa, packed) {
            (Isa::Avx512, false) if half => go!(avx512, 1, 0; 1 2 3 4 5 6 7 8 9 10 11 12),
            (Isa::Avx512, false) => go!(avx512, 2, 0; 1 2 3 4 5 6 7 8 9 10 11 12),
            (Isa::Avx512, true) if half => go!(avx512, 1, MR; 1 2 3 4 5 6 7 8 9 10 11 12),
            (Isa::Avx512, true) => go!(avx512, 2, MR; 1 2 3 4 5 6 7 8 9 10 11 12),
            (_, false) if !half => go!(avx2, 4, 0; 1 2),
            (_, false) => go!(avx2, 2, 0; 1 2 3 4 5 6),
            (_, true) => {
                // Packed rows go through half panels only (see `row_blocks`).
                assert!(half, "packed AVX2 rows need half panels");
                go!(avx2, 2, MR_AVX2; 1 2 3 4 5 6)
            }
        }
        return;
    }
    let _ = (isa, prefetch, packed);
    let mut acc = [[0.0f32; NR]; MR_PORTABLE];
    for (r, a) in acc.iter_mut().enumerate().take(rows) {
        for (j, v) in a.iter_mut().enumerate().take(ncols) {
            *v = match init {
                Init::Zero => 0.0,
                Init::Bias(b) => b[j],
                // SAFETY: row r < rows and column j < ncols of the block (caller's contract).
                Init::Accumulate => unsafe { *y.add(r * ldy + j) },
            };
        }
    }
    portable(rows, x, ldx, kc, w, ldw, ncols, &mut acc);
    for (r, a) in acc.iter_mut().enumerate().take(rows) {
        if relu {
            super::Act::Relu.apply(&mut a[..ncols]);
        }
        for (j, &v) in a.iter().enumerate().take(ncols) {
            // SAFETY: row r < rows and column j < ncols of the block (caller's contract).
            unsafe { *y.add(r * ldy + j) = v };
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn portable(
    rows: usize,
    x: &[f32],
    ldx: usize,
    kc: usize,
    w: &[f32],
    ldw: usize,
    ncols: usize,
    acc: &mut [[f32; NR]; MR_PORTABLE],
) {
    if rows == 1 && ncols == NR {
        // Batch 1: one row's accumulators fit in registers when they are a local (the
        // general loop below keeps them in memory, as `rows` is not known).
        let mut a = acc[0];
        for i in 0..kc {
            let wr: &[f32; NR] = w[i * ldw..i * ldw + NR].try_into().expect("NR floats");
            let xv = x[i];
            for (av, &wv) in a.iter_mut().zip(wr) {
                *av += xv * wv;
            }
        }
        acc[0] = a;
    } else if ncols == NR {
        for i in 0..kc {
            let wr: &[f32; NR] = w[i * ldw..i * ldw + NR].try_into().expect("NR floats");
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let xv = x[r * ldx + i];
                for (av, &wv) in a.iter_mut().zip(wr) {
                    *av += xv * wv;
                }
            }
        }
    } else {
        for i in 0..kc {
            let wr = &w[i * ldw..i * ldw + ncols];
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let xv = x[r * ldx + i];
                for (av, &wv) in a.iter_mut().zip(wr) {
                    *av += xv * wv;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    fn masks(ncols: usize) -> (__mmask16, __mmask16) {
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
        (m0, m1)
    }

    /// `y[0..R, 0..ncols] (=|+=) x[R × kc] · w[kc × ncols] (+ bias)`.
    ///
    /// Masked-off lanes are never read or written (AVX-512 masked loads suppress
    /// faults), so only the `ncols` columns of each row are touched.
    ///
    /// # Safety
    /// avx512f must be available; `x` must be valid for reads of `kc` floats at
    /// `x + r*ldx` (`r < R`), `w` for `ncols` floats at `w + i*ldw` (`i < kc`),
    /// `bias` (if any) has ≥ `ncols` floats, and `y` must be valid for reads and
    /// writes of `ncols` floats at `y + r*ldy` for every `r < R`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel<const R: usize, const C: usize, const P: usize>(
        x: *const f32,
        ldx: usize,
        kc: usize,
        w: *const f32,
        ldw: usize,
        prefetch: &[f32],
        bias: Option<&[f32]>,
        accumulate: bool,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
        relu: bool,
    ) {
        debug_assert!(ncols <= 16 * C && (P == 0 || P >= R));
        // One cache line of `prefetch` is requested per iteration of the k loop (at
        // most kc lines: the caller hands each row block a slice of ≤ kc lines).
        let lines = prefetch.len().div_ceil(16).min(kc);
        let pf = prefetch.as_ptr();
        let (m0, m1) = masks(ncols);
        let mask = [m0, m1];
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        if accumulate {
            for (r, a) in acc.iter_mut().enumerate() {
                let yr = y.add(r * ldy);
                for (c, v) in a.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask[c], yr.add(16 * c));
                }
            }
        } else if let Some(b) = bias {
            let mut bv = [_mm512_setzero_ps(); C];
            for (c, v) in bv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask[c], b.as_ptr().add(16 * c));
            }
            for a in acc.iter_mut() {
                *a = bv;
            }
        }
        // Input `i` of row `r`: rows `ldx` apart, or packed (`P` rows per input).
        let xat = |r: usize, i: usize| {
            if P == 0 {
                x.add(r * ldx + i)
            } else {
                x.add(i * P + r)
            }
        };
        if ncols == 16 * C {
            for i in 0..kc {
                if i < lines {
                    // Into L2: L1 cannot hold the next block beside this one. A
                    // prefetch is only a hint; it never faults.
                    _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(i * 16).cast());
                }
                // SAFETY (whole loop): i < kc, r < R: inside the caller's ranges.
                let wr = w.add(i * ldw);
                let mut wv = [_mm512_setzero_ps(); C];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wr.add(16 * c));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xat(r, i));
                    for (v, &wc) in a.iter_mut().zip(&wv) {
                        *v = _mm512_fmadd_ps(xv, wc, *v);
                    }
                }
            }
        } else {
            for i in 0..kc {
                let wr = w.add(i * ldw);
                let mut wv = [_mm512_setzero_ps(); C];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask[c], wr.add(16 * c));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xat(r, i));
                    for (v, &wc) in a.iter_mut().zip(&wv) {
                        *v = _mm512_fmadd_ps(xv, wc, *v);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let yr = y.add(r * ldy);
            for (c, &v) in a.iter().enumerate() {
                // max(v, 0) gives 0 for NaN, as `Act::Relu` does.
                let v = if relu {
                    _mm512_max_ps(v, _mm512_setzero_ps())
                } else {
                    v
                };
                _mm512_mask_storeu_ps(yr.add(16 * c), mask[c], v);
            }
        }
    }

    /// `y[0..R, 0..ncols] = bias + Σ_s Σ_i rows[r][segs[s] + i] · w[s·seg + i]` for
    /// `i < seg`: a convolution's output pixels, row `r` reading its window's runs
    /// (`segs`: their offsets) straight from the padded input; the accumulators stay in
    /// registers over the whole window.
    ///
    /// # Safety
    /// avx512f must be available; `rows[r] + segs[s] .. + seg` must be valid for reads
    /// for every `r < R` and `s`, `w + i*ldw .. + ncols` for every
    /// `i < segs.len() · seg`; `bias` (if any) has ≥ `ncols` floats, and `y` must be
    /// valid for writes of `ncols` floats at `y + r*ldy` for every `r < R`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_kernel<const R: usize>(
        rows: &[*const f32],
        segs: &[usize],
        seg: usize,
        w: *const f32,
        ldw: usize,
        bias: Option<&[f32]>,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
        relu: bool,
    ) {
        debug_assert!(ncols <= 32 && rows.len() >= R);
        let (m0, m1) = masks(ncols);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if let Some(b) = bias {
            let b0 = _mm512_maskz_loadu_ps(m0, b.as_ptr());
            let b1 = _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16));
            for a in acc.iter_mut() {
                *a = [b0, b1];
            }
        }
        for (s, &off) in segs.iter().enumerate() {
            let mut xr = [std::ptr::null::<f32>(); R];
            for (p, &row) in xr.iter_mut().zip(rows) {
                *p = row.add(off);
            }
            let ws = w.add(s * seg * ldw);
            // SAFETY (all loops): i < seg, r < R: inside the caller's ranges.
            if ncols == 32 {
                // Plain loads for whole panels: on Intel a masked load also takes
                // an FMA port (the image model's 3×3 convs, batch 64, one thread: 5%
                // faster than masked loads).
                for i in 0..seg {
                    let wr = ws.add(i * ldw);
                    let w0 = _mm512_loadu_ps(wr);
                    let w1 = _mm512_loadu_ps(wr.add(16));
                    for (a, &p) in acc.iter_mut().zip(&xr) {
                        let xv = _mm512_set1_ps(*p.add(i));
                        a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                    }
                }
            } else {
                for i in 0..seg {
                    let wr = ws.add(i * ldw);
                    let w0 = _mm512_maskz_loadu_ps(m0, wr);
                    let w1 = _mm512_maskz_loadu_ps(m1, wr.add(16));
                    for (a, &p) in acc.iter_mut().zip(&xr) {
                        let xv = _mm512_set1_ps(*p.add(i));
                        a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let yr = y.add(r * ldy);
            let mut a = *a;
            if relu {
                // max(v, 0) gives 0 for NaN, as `Act::Relu` does.
                a = a.map(|v| _mm512_max_ps(v, _mm512_setzero_ps()));
            }
            _mm512_mask_storeu_ps(yr, m0, a[0]);
            _mm512_mask_storeu_ps(yr.add(16), m1, a[1]);
        }
    }

    /// [`gather_kernel`] over a 64-column double panel (`32 < ncols ≤ 64`): R ≤ 6
    /// pixels × 4 accumulators, so each broadcast input feeds four FMAs (half the
    /// broadcasts per FMA of the 32-column kernel).
    ///
    /// # Safety
    /// As [`gather_kernel`], with `ncols ≤ 64`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_kernel_wide<const R: usize>(
        rows: &[*const f32],
        segs: &[usize],
        seg: usize,
        w: *const f32,
        ldw: usize,
        bias: Option<&[f32]>,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
        relu: bool,
    ) {
        debug_assert!(ncols > 32 && ncols <= 64 && rows.len() >= R);
        let (m2, m3) = masks(ncols - 32);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if let Some(b) = bias {
            let b = b.as_ptr();
            let bv = [
                _mm512_loadu_ps(b),
                _mm512_loadu_ps(b.add(16)),
                _mm512_maskz_loadu_ps(m2, b.add(32)),
                _mm512_maskz_loadu_ps(m3, b.add(48)),
            ];
            for a in acc.iter_mut() {
                *a = bv;
            }
        }
        for (s, &off) in segs.iter().enumerate() {
            let mut xr = [std::ptr::null::<f32>(); R];
            for (p, &row) in xr.iter_mut().zip(rows) {
                *p = row.add(off);
            }
            let ws = w.add(s * seg * ldw);
            // Plain loads for a whole double panel (see `gather_kernel`).
            let full = ncols == 64;
            for i in 0..seg {
                let wr = ws.add(i * ldw);
                let wv = if full {
                    [
                        _mm512_loadu_ps(wr),
                        _mm512_loadu_ps(wr.add(16)),
                        _mm512_loadu_ps(wr.add(32)),
                        _mm512_loadu_ps(wr.add(48)),
                    ]
                } else {
                    [
                        _mm512_loadu_ps(wr),
                        _mm512_loadu_ps(wr.add(16)),
                        _mm512_maskz_loadu_ps(m2, wr.add(32)),
                        _mm512_maskz_loadu_ps(m3, wr.add(48)),
                    ]
                };
                for (a, &p) in acc.iter_mut().zip(&xr) {
                    let xv = _mm512_set1_ps(*p.add(i));
                    for (av, &wv) in a.iter_mut().zip(&wv) {
                        *av = _mm512_fmadd_ps(xv, wv, *av);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let yr = y.add(r * ldy);
            let mut a = *a;
            if relu {
                a = a.map(|v| _mm512_max_ps(v, _mm512_setzero_ps()));
            }
            _mm512_storeu_ps(yr, a[0]);
            _mm512_storeu_ps(yr.add(16), a[1]);
            _mm512_mask_storeu_ps(yr.add(32), m2, a[2]);
            _mm512_mask_storeu_ps(yr.add(48), m3, a[3]);
        }
    }

    /// `y[0..len] += Σ_r x[r] · w[r*ldw .. r*ldw + len]` for `r < R`.
    ///
    /// # Safety
    /// avx512f must be available; `y` valid for reads and writes of `len` floats,
    /// `w + r*ldw` for reads of `len` floats for every `r < R`; `x.len() >= R`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_rows<const R: usize>(
        y: *mut f32,
        w: *const f32,
        ldw: usize,
        x: &[f32],
        len: usize,
    ) {
        debug_assert!(x.len() >= R);
        let mut xv = [_mm512_setzero_ps(); R];
        for (v, &s) in xv.iter_mut().zip(x) {
            *v = _mm512_set1_ps(s);
        }
        let mut j = 0;
        while j + 32 <= len {
            let mut a0 = _mm512_loadu_ps(y.add(j));
            let mut a1 = _mm512_loadu_ps(y.add(j + 16));
            for (r, v) in xv.iter().enumerate() {
                let wr = w.add(r * ldw + j);
                a0 = _mm512_fmadd_ps(*v, _mm512_loadu_ps(wr), a0);
                a1 = _mm512_fmadd_ps(*v, _mm512_loadu_ps(wr.add(16)), a1);
            }
            _mm512_storeu_ps(y.add(j), a0);
            _mm512_storeu_ps(y.add(j + 16), a1);
            j += 32;
        }
        while j < len {
            let left = len - j;
            let m: __mmask16 = if left >= 16 {
                0xffff
            } else {
                ((1u32 << left) - 1) as u16
            };
            let mut a = _mm512_maskz_loadu_ps(m, y.add(j));
            for (r, v) in xv.iter().enumerate() {
                a = _mm512_fmadd_ps(*v, _mm512_maskz_loadu_ps(m, w.add(r * ldw + j)), a);
            }
            _mm512_mask_storeu_ps(y.add(j), m, a);
            j += 16;
        }
    }

    /// Interleaved ranges (streams) of a panel's rows in [`gemv_panel`].
    const STREAMS: usize = 4;

    /// `y[r, ..ncols] = x[r] · w + bias` for `R` rows of `x` (`k` floats each, one after
    /// the other) and one 32-column panel `w` (`k` rows of 32 floats), its rows read as
    /// `STREAMS` interleaved ranges; range `s` adds into accumulator set `s % A` (`R × 2
    /// × A` zmm: 8 at batch 1, 24 for 3 rows in 4 sets, 16 for 8 rows in one); then
    /// `max(y, 0)` with `relu`.
    ///
    /// # Safety
    /// avx512f must be available; `x` valid for reads of `R * k` floats, `w` of
    /// `32 * k`; `bias` (if any) ≥ `ncols` floats; `y + r*ldy` valid for writes of
    /// `ncols` ≤ 32 floats for every `r < R`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_panel<const R: usize, const A: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        bias: Option<&[f32]>,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
        relu: bool,
    ) {
        let q = k / STREAMS;
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; A];
        // SAFETY (both loops): every row index is < k, so every load is inside w and x.
        for i in 0..q {
            for s in 0..STREAMS {
                let a = &mut acc[s % A];
                let r = s * q + i;
                let wr = w.add(r * 32);
                let (w0, w1) = (_mm512_loadu_ps(wr), _mm512_loadu_ps(wr.add(16)));
                for (j, aj) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(j * k + r));
                    aj[0] = _mm512_fmadd_ps(xv, w0, aj[0]);
                    aj[1] = _mm512_fmadd_ps(xv, w1, aj[1]);
                }
            }
        }
        for r in STREAMS * q..k {
            let wr = w.add(r * 32);
            let (w0, w1) = (_mm512_loadu_ps(wr), _mm512_loadu_ps(wr.add(16)));
            for (j, aj) in acc[0].iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(j * k + r));
                aj[0] = _mm512_fmadd_ps(xv, w0, aj[0]);
                aj[1] = _mm512_fmadd_ps(xv, w1, aj[1]);
            }
        }
        let (m0, m1) = masks(ncols);
        let start = match bias {
            Some(b) => [
                _mm512_maskz_loadu_ps(m0, b.as_ptr()),
                _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16)),
            ],
            None => [_mm512_setzero_ps(); 2],
        };
        for j in 0..R {
            let mut sum = start;
            for a in &acc {
                sum[0] = _mm512_add_ps(sum[0], a[j][0]);
                sum[1] = _mm512_add_ps(sum[1], a[j][1]);
            }
            if relu {
                // max(v, 0) gives 0 for NaN, as `Act::Relu` does.
                sum = sum.map(|v| _mm512_max_ps(v, _mm512_setzero_ps()));
            }
            let yr = y.add(j * ldy);
            _mm512_mask_storeu_ps(yr, m0, sum[0]);
            _mm512_mask_storeu_ps(yr.add(16), m1, sum[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Streams, each with its own accumulators, of the batch-1 panel kernel (see
    /// `super::gemv_panel`): 2 × 4 ymm accumulators, 2 broadcasts, the weights as
    /// memory operands.
    const STREAMS: usize = 2;

    /// `y[..ncols] = x · w + bias` for one 32-column panel `w` (`x.len()` rows of 32
    /// floats), its rows read as `STREAMS` interleaved ranges.
    ///
    /// # Safety
    /// avx2 and fma must be available; `w` valid for reads of `32 * x.len()` floats,
    /// `bias` (if any) ≥ `ncols` floats, `y` valid for writes of `ncols` ≤ 32 floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv_panel(
        x: &[f32],
        w: *const f32,
        bias: Option<&[f32]>,
        y: *mut f32,
        ncols: usize,
    ) {
        let k = x.len();
        let q = k / STREAMS;
        let mut acc = [[_mm256_setzero_ps(); 4]; STREAMS];
        // SAFETY (both loops): every row index is < k, so every load is inside w.
        for i in 0..q {
            for (s, a) in acc.iter_mut().enumerate() {
                let r = s * q + i;
                let wr = w.add(r * 32);
                let xv = _mm256_set1_ps(*x.get_unchecked(r));
                for (v, av) in a.iter_mut().enumerate() {
                    *av = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wr.add(8 * v)), *av);
                }
            }
        }
        for (r, &xr) in x.iter().enumerate().skip(STREAMS * q) {
            let wr = w.add(r * 32);
            let xv = _mm256_set1_ps(xr);
            for (v, av) in acc[0].iter_mut().enumerate() {
                *av = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wr.add(8 * v)), *av);
            }
        }
        let mk = masks::<4>(ncols);
        let mut sum = [_mm256_setzero_ps(); 4];
        if let Some(b) = bias {
            for (v, sv) in sum.iter_mut().enumerate() {
                *sv = load(b.as_ptr(), v, ncols, &mk);
            }
        }
        for a in &acc {
            for (sv, av) in sum.iter_mut().zip(a) {
                *sv = _mm256_add_ps(*sv, *av);
            }
        }
        for (v, sv) in sum.iter().enumerate() {
            store(y, v, ncols, &mk, *sv);
        }
    }

    /// Vector `v` of a row from `p` (`ncols` columns of it, `mk` their masks): a plain
    /// load where all 8 lanes are columns. On AMD a masked load costs more than a plain
    /// one, and a masked store is microcoded: the 2048×2048 layer at batch 64 on an AMD
    /// EPYC VM (Zen 3), 1 thread, median 10.9–11.3 → 8.0–8.2 ms with plain stores.
    #[inline(always)]
    unsafe fn load(p: *const f32, v: usize, ncols: usize, mk: &[__m256i]) -> __m256 {
        if 8 * (v + 1) <= ncols {
            _mm256_loadu_ps(p.add(8 * v))
        } else {
            _mm256_maskload_ps(p.add(8 * v), mk[v])
        }
    }

    /// Vector `v` of a row to `p`, as [`load`] reads it.
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: usize, ncols: usize, mk: &[__m256i], a: __m256) {
        if 8 * (v + 1) <= ncols {
            _mm256_storeu_ps(p.add(8 * v), a)
        } else {
            _mm256_maskstore_ps(p.add(8 * v), mk[v], a)
        }
    }

    /// Lane masks for the first `ncols` of `8 * V` columns.
    #[target_feature(enable = "avx2")]
    fn masks<const V: usize>(ncols: usize) -> [__m256i; V] {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut m = [_mm256_setzero_si256(); V];
        for (v, mv) in m.iter_mut().enumerate() {
            let left = ncols.saturating_sub(8 * v).min(8) as i32;
            *mv = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
        }
        m
    }

    /// `y[0..R, 0..ncols] (=|+=) x[R × kc] · w[kc × ncols] (+ bias)`, `ncols ≤ 8·V`,
    /// with R×V ymm accumulators.
    ///
    /// Masked-off lanes are never read or written (AVX masked loads and stores
    /// suppress faults), so only the `ncols` columns of each row are touched.
    ///
    /// # Safety
    /// avx2 and fma must be available; `x` must be valid for reads of `kc` floats at
    /// `x + r*ldx` (`r < R`), `w` for `ncols` floats at `w + i*ldw` (`i < kc`),
    /// `bias` (if any) has ≥ `ncols` floats, and `y` must be valid for reads and
    /// writes of `ncols` floats at `y + r*ldy` for every `r < R`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel<const R: usize, const V: usize, const P: usize>(
        x: *const f32,
        ldx: usize,
        kc: usize,
        w: *const f32,
        ldw: usize,
        prefetch: &[f32],
        bias: Option<&[f32]>,
        accumulate: bool,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
        relu: bool,
    ) {
        debug_assert!(ncols <= 8 * V && (P == 0 || P >= R));
        // Input `i` of row `r`: rows `ldx` apart, or packed (`P` rows per input).
        let xat = |r: usize, i: usize| {
            if P == 0 {
                x.add(r * ldx + i)
            } else {
                x.add(i * P + r)
            }
        };
        // One cache line of `prefetch` per iteration of the k loop (at most kc lines:
        // the caller hands each call a slice of ≤ kc lines).
        let lines = prefetch.len().div_ceil(16).min(kc);
        let pf = prefetch.as_ptr();
        let mk = masks::<V>(ncols);
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if accumulate {
            for (r, a) in acc.iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    *av = load(y.add(r * ldy), v, ncols, &mk);
                }
            }
        } else if let Some(b) = bias {
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, b8) in bv.iter_mut().enumerate() {
                *b8 = load(b.as_ptr(), v, ncols, &mk);
            }
            for a in acc.iter_mut() {
                *a = bv;
            }
        }
        if ncols == 8 * V {
            // One input of every row (i < kc, r < R: inside the caller's ranges).
            let step = |acc: &mut [[__m256; V]; R], i: usize| {
                let wr = w.add(i * ldw);
                let mut wv = [_mm256_setzero_ps(); V];
                for (v, w8) in wv.iter_mut().enumerate() {
                    *w8 = _mm256_loadu_ps(wr.add(8 * v));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xat(r, i));
                    for (av, w8) in a.iter_mut().zip(&wv) {
                        *av = _mm256_fmadd_ps(xv, *w8, *av);
                    }
                }
            };
            // Four inputs per pass, the prefetching ones first: a loop of one input
            // spent 8–10 of its ~28 µops on counters, branches and the prefetch test.
            // On the AMD EPYC (Zen 3) VM, whose two vCPUs reach 127 GFLOP/s of FMA
            // together against 82–89 alone (they share a core's resources), a
            // 2048×2048 layer on 2 threads, old and new alternating: batch 64 5.0–7.0
            // → 4.6–4.7 ms median, batch 16 1.41–1.75 → 1.32–1.58 ms.
            let mut i = 0;
            for (pref, end) in [(true, lines), (false, kc)] {
                while i + 4 <= end {
                    for u in 0..4 {
                        if pref {
                            // Into L2: L1 cannot hold the next block beside this one.
                            // A prefetch is only a hint; it never faults.
                            _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add((i + u) * 16).cast());
                        }
                        step(&mut acc, i + u);
                    }
                    i += 4;
                }
                while i < end {
                    if pref {
                        _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(i * 16).cast());
                    }
                    step(&mut acc, i);
                    i += 1;
                }
            }
        } else {
            for i in 0..kc {
                let wr = w.add(i * ldw);
                let mut wv = [_mm256_setzero_ps(); V];
                for (v, w8) in wv.iter_mut().enumerate() {
                    *w8 = _mm256_maskload_ps(wr.add(8 * v), mk[v]);
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xat(r, i));
                    for (av, w8) in a.iter_mut().zip(&wv) {
                        *av = _mm256_fmadd_ps(xv, *w8, *av);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, &av) in a.iter().enumerate() {
                // max(v, 0) gives 0 for NaN, as `Act::Relu` does.
                let av = if relu {
                    _mm256_max_ps(av, _mm256_setzero_ps())
                } else {
                    av
                };
                store(y.add(r * ldy), v, ncols, &mk, av);
            }
        }
    }

    /// The AVX2 form of `avx512::gather_kernel`: `y[r, ..ncols] = bias + Σ_s
    /// rows[r][segs[s] .. + seg] · w[s·seg .., ..ncols]` for R ≤ 6 output pixels of a
    /// convolution and `ncols` ≤ 16 columns (a half panel: R × 2 accumulators), each
    /// pixel's window read in its runs straight from the padded input; then `max(y, 0)`
    /// with `relu`.
    ///
    /// # Safety
    /// avx2 and fma must be available; `rows[r] + segs[s] .. + seg` must be valid for
    /// reads for every `r < R` and `s`, `w + i*ldw .. + ncols` for every `i <
    /// segs.len() · seg`; `bias` (if any) has ≥ `ncols` floats, and `y` must be valid
    /// for writes of `ncols` floats at `y + r*ldy` for every `r < R`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_kernel<const R: usize>(
        rows: &[*const f32],
        segs: &[usize],
        seg: usize,
        w: *const f32,
        ldw: usize,
        bias: Option<&[f32]>,
        y: *mut f32,
        ldy: usize,
        ncols: usize,
        relu: bool,
    ) {
        debug_assert!(ncols <= 16 && rows.len() >= R);
        let mk = masks::<2>(ncols);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if let Some(b) = bias {
            let bv = [
                load(b.as_ptr(), 0, ncols, &mk),
                load(b.as_ptr(), 1, ncols, &mk),
            ];
            for a in acc.iter_mut() {
                *a = bv;
            }
        }
        for (s, &off) in segs.iter().enumerate() {
            let mut xr = [std::ptr::null::<f32>(); R];
            for (p, &row) in xr.iter_mut().zip(rows) {
                *p = row.add(off);
            }
            let ws = w.add(s * seg * ldw);
            // SAFETY (both loops): i < seg, r < R: inside the caller's ranges.
            if ncols == 16 {
                for i in 0..seg {
                    let wr = ws.add(i * ldw);
                    let w0 = _mm256_loadu_ps(wr);
                    let w1 = _mm256_loadu_ps(wr.add(8));
                    for (a, &p) in acc.iter_mut().zip(&xr) {
                        let xv = _mm256_broadcast_ss(&*p.add(i));
                        a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                    }
                }
            } else {
                for i in 0..seg {
                    let wr = ws.add(i * ldw);
                    let w0 = _mm256_maskload_ps(wr, mk[0]);
                    let w1 = _mm256_maskload_ps(wr.add(8), mk[1]);
                    for (a, &p) in acc.iter_mut().zip(&xr) {
                        let xv = _mm256_broadcast_ss(&*p.add(i));
                        a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let yr = y.add(r * ldy);
            for (v, &av) in a.iter().enumerate() {
                // max(v, 0) gives 0 for NaN, as `Act::Relu` does.
                let av = if relu {
                    _mm256_max_ps(av, _mm256_setzero_ps())
                } else {
                    av
                };
                store(yr, v, ncols, &mk, av);
            }
        }
    }

    /// `y[0..len] += Σ_r x[r] · w[r*ldw .. r*ldw + len]` for `r < R`.
    ///
    /// # Safety
    /// avx2 and fma must be available; `y` valid for reads and writes of `len`
    /// floats, `w + r*ldw` for reads of `len` floats for every `r < R`; `x.len() >= R`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows<const R: usize>(
        y: *mut f32,
        w: *const f32,
        ldw: usize,
        x: &[f32],
        len: usize,
    ) {
        debug_assert!(x.len() >= R);
        let mut xv = [_mm256_setzero_ps(); R];
        for (v, &s) in xv.iter_mut().zip(x) {
            *v = _mm256_set1_ps(s);
        }
        let mut j = 0;
        while j + 32 <= len {
            let mut a = [_mm256_setzero_ps(); 4];
            for (q, aq) in a.iter_mut().enumerate() {
                *aq = _mm256_loadu_ps(y.add(j + 8 * q));
            }
            for (r, v) in xv.iter().enumerate() {
                let wr = w.add(r * ldw + j);
                for (q, aq) in a.iter_mut().enumerate() {
                    *aq = _mm256_fmadd_ps(*v, _mm256_loadu_ps(wr.add(8 * q)), *aq);
                }
            }
            for (q, aq) in a.iter().enumerate() {
                _mm256_storeu_ps(y.add(j + 8 * q), *aq);
            }
            j += 32;
        }
        while j < len {
            let [m] = masks::<1>(len - j);
            let mut a = _mm256_maskload_ps(y.add(j), m);
            for (r, v) in xv.iter().enumerate() {
                a = _mm256_fmadd_ps(*v, _mm256_maskload_ps(w.add(r * ldw + j), m), a);
            }
            _mm256_maskstore_ps(y.add(j), m, a);
            j += 8;
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

    #[test]
    fn hand_checked() {
        // [1 2] · [[1 2 3] [4 5 6]] + [1 1 1] = [10 13 16]
        let mut y = [0.0; 3];
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        dense(
            &[1.0, 2.0],
            Kernel::Rows(&w),
            Some(&[1.0; 3]),
            &mut y,
            1,
            2,
            3,
            1,
        );
        assert_eq!(y, [10.0, 13.0, 16.0]);
        let mut y = [0.0; 6];
        dense(
            &[1.0, 2.0, 0.0, 1.0],
            Kernel::Rows(&w),
            None,
            &mut y,
            2,
            2,
            3,
            1,
        );
        assert_eq!(y, [9.0, 12.0, 15.0, 4.0, 5.0, 6.0]);
    }

    /// Run `f` (given the row-major kernel) on every shape, with and without a bias, on
    /// 1 and 3 threads of a 3-thread pool; every output must be within `tol(expected)`.
    #[allow(clippy::type_complexity)]
    fn check_shapes(
        shapes: &[(usize, usize, usize)],
        tol: fn(f32) -> f32,
        f: &(dyn Fn(&[f32], &[f32], Option<&[f32]>, &mut [f32], usize, usize, usize, usize) + Sync),
    ) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for &(m, k, n) in shapes {
            let x = vals(m * k, 1);
            let w = vals(k * n, 2);
            let b = vals(n, 3);
            for bias in [Some(&b[..]), None] {
                let want = naive(&x, &w, bias, m, k, n);
                for threads in [1, 3] {
                    let mut y = vec![f32::NAN; m * n];
                    pool.install(|| f(&x, &w, bias, &mut y, m, k, n, threads));
                    for (a, e) in y.iter().zip(&want) {
                        assert!((a - e).abs() <= tol(*e), "m={m} k={k} n={n}: {a} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_naive_all_shapes() {
        let shapes = [
            (1, 7, 5),
            (1, 513, 1000),
            (1, 300, 4099),
            (1, 2, 40000),
            (2, 33, 300),
            (4, 9, 17),
            (5, 64, 70),
            (3, 700, 45),
            (13, 130, 9),
            (37, 20, 64),
            (64, 100, 33),
            (20, 600, 100),
            // AVX2 tiles: 2×32 with a ragged panel, 6×16 halves with ragged ones.
            (2, 300, 50),
            (6, 257, 40),
            (7, 40, 20),
            (12, 10, 31),
            // Kernels larger than SMALL_KERNEL: the panel-outer order.
            (14, 300, 260),
            (7, 600, 130),
        ];
        for isa in isas() {
            check_shapes(&shapes, |_| 2e-3, &|x, w, bias, y, m, k, n, t| {
                dense_with(isa, x, Kernel::Rows(w), bias, y, m, k, n, t, &mut [], false)
            });
        }
    }

    /// The kernel families this CPU can run (portable always).
    fn isas() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    #[test]
    fn switches_choose_the_family() {
        let best = Isa::ALL.into_iter().find(|i| i.supported()).unwrap();
        assert_eq!(Isa::choose(None, false), best);
        assert_eq!(Isa::choose(Some("nonsense"), false), best);
        assert_eq!(Isa::choose(Some("portable"), false), Isa::Portable);
        assert_eq!(Isa::choose(Some("portable"), true), Isa::Portable);
        // A family the CPU lacks falls back to the next one down.
        let avx2 = Isa::choose(Some("avx2"), false);
        assert_eq!(avx2, Isa::choose(None, true));
        assert_eq!(avx2 == Isa::Avx2, Isa::Avx2.supported());
        assert!(avx2 >= Isa::Avx2 && Isa::choose(Some("avx512"), true) == avx2);
    }

    #[test]
    fn panels_match_naive_all_shapes() {
        let shapes = [
            (1, 7, 5),
            (1, 513, 1000),
            (1, 2048, 67),
            // Batch 1's streams: fewer rows than streams, a tail after them.
            (1, 1, 3),
            (1, 3, 40),
            (1, 6, 33),
            // Two to eight rows streamed the same way (see `streams_panels`): fewer
            // inputs than streams, tails, ragged last panels.
            (2, 3, 67),
            (3, 5, 40),
            (3, 2, 3),
            (4, 1, 33),
            (4, 7, 64),
            (4, 515, 100),
            (2, 33, 300),
            (5, 64, 70),
            (13, 130, 9),
            (37, 600, 64),
            (64, 512, 96),
            (3, 0, 4),
            (2, 300, 50),
            (6, 257, 40),
            (7, 40, 20),
            // Five to eight rows, streams sharing accumulator sets.
            (5, 515, 33),
            (6, 2, 100),
            (8, 3, 33),
            (8, 130, 64),
            (13, 520, 140),
            // Tall, with a kernel past SMALL_KERNEL: rows outer (`TALL_ROWS`).
            (1030, 300, 260),
        ];
        for isa in isas() {
            check_shapes(
                &shapes,
                |e| 1e-4 * (1.0 + e.abs()),
                &|x, w, bias, y, m, k, n, t| {
                    let wp = pack_panels(w, k, n);
                    assert_eq!(wp.len(), n.div_ceil(NR) * k * NR);
                    dense_with(
                        isa,
                        x,
                        Kernel::Panels(&wp),
                        bias,
                        y,
                        m,
                        k,
                        n,
                        t,
                        &mut [],
                        false,
                    )
                },
            );
        }
    }

    /// Whether `dense_with` packs rows of `x` for this shape (with enough scratch).
    fn packs(isa: Isa, m: usize, k: usize, n: usize, threads: usize) -> bool {
        let np = n.div_ceil(NR);
        packs_rows(isa, m, np, panel_tasks(threads, np, k))
    }

    #[test]
    fn packed_rows_match_naive() {
        let shapes = [
            // One group of two row blocks; a ragged last block; k-blocks with a tail.
            (13, 300, 140),
            (24, 257, 400),
            (7, 33, 500),
            // Several groups (200 rows: 3 groups), a ragged last panel.
            (200, 520, 390),
            (97, 129, 130),
            // Few panels that split unevenly: tasks own rows (`few_panels`; 67 columns on
            // 2 threads in `fused_relu_matches_relu_after`), a 3-column panel.
            (100, 700, 131),
        ];
        for isa in isas() {
            check_shapes(
                &shapes,
                |e| 1e-4 * (1.0 + e.abs()),
                &|x, w, bias, y, m, k, n, t| {
                    let wp = pack_panels(w, k, n);
                    let mut scratch = vec![f32::NAN; pack_len(isa, m) * t];
                    dense_with(
                        isa,
                        x,
                        Kernel::Panels(&wp),
                        bias,
                        y,
                        m,
                        k,
                        n,
                        t,
                        &mut scratch,
                        false,
                    )
                },
            );
            // The shapes above exercise the packed path (on every family but portable).
            let packed = shapes
                .iter()
                .flat_map(|&(m, k, n)| [1, 3].map(|t| packs(isa, m, k, n, t)));
            assert!(isa == Isa::Portable || packed.filter(|&p| p).count() >= 6);
        }
    }

    #[test]
    fn fused_relu_matches_relu_after() {
        // Every path: batch-1 rows and panels, blocked panels, packed rows, rows
        // outer, nothing to multiply; a NaN input row (ReLU maps NaN to 0).
        let shapes = [
            (1, 300, 100),
            (2, 300, 100),
            (3, 41, 33),
            (4, 100, 70),
            (5, 64, 70),
            (24, 257, 400),
            (100, 1100, 67),
            (3, 0, 4),
        ];
        for isa in isas() {
            for &(m, k, n) in &shapes {
                let mut x = vals(m * k, 7);
                if m > 1 && k > 0 {
                    x[k + 3] = f32::NAN;
                }
                let (w, b) = (vals(k * n, 8), vals(n, 9));
                let mut want = naive(&x, &w, Some(&b), m, k, n);
                super::super::Act::Relu.apply(&mut want);
                let wp = pack_panels(&w, k, n);
                for (kernel, threads) in [(Kernel::Rows(&w), 1), (Kernel::Panels(&wp), 2)] {
                    let mut y = vec![f32::NAN; m * n];
                    let mut scratch = vec![0.0; pack_len(isa, m) * threads];
                    let (b, s) = (Some(&b[..]), &mut scratch[..]);
                    dense_with(isa, &x, kernel, b, &mut y, m, k, n, threads, s, true);
                    for (a, e) in y.iter().zip(&want) {
                        assert!(
                            *a >= 0.0 && (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{a} {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn portable_kernels_match() {
        let (m, k, n) = (6, 19, 45);
        let x = vals(m * k, 4);
        let w = vals(k * n, 5);
        let b = vals(n, 6);
        let want = naive(&x, &w, Some(&b), m, k, n);
        let mut y = vec![f32::NAN; m * n];
        for p in 0..n.div_ceil(NR) {
            let c0 = p * NR;
            let ncols = NR.min(n - c0);
            let mut r0 = 0;
            while r0 < m {
                let rows = MR_PORTABLE.min(m - r0);
                let yb = y[r0 * n + c0..].as_mut_ptr();
                // Two k-blocks: bias first, then accumulate.
                for (k0, kc) in [(0, 10), (10, k - 10)] {
                    let init = if k0 == 0 {
                        Init::Bias(&b[c0..c0 + ncols])
                    } else {
                        Init::Accumulate
                    };
                    // SAFETY: the block (rows × ncols, row stride n) lies inside y.
                    unsafe {
                        micro(
                            Isa::Portable,
                            rows,
                            XRows::Strided(&x[r0 * k + k0..], k),
                            kc,
                            &w[k0 * n + c0..],
                            n,
                            &[],
                            init,
                            yb,
                            n,
                            ncols,
                            false,
                        )
                    };
                }
                r0 += rows;
            }
        }
        for (a, e) in y.iter().zip(&want) {
            assert!((a - e).abs() < 1e-3);
        }
        let mut y1 = b.clone();
        gemv_cols(Isa::Portable, &x[..k], &w, &mut y1, k, n, 0);
        for (a, e) in y1.iter().zip(&want[..n]) {
            assert!((a - e).abs() < 1e-3);
        }
    }
}
