//! Convolution (im2col + the dense micro-kernel; the `gemm` crate for grouped
//! convolutions; direct depthwise) and window pooling.
//!
//! 1-D ops are run as 2-D ones with height 1. Geometry is validated by `program`.

use std::ops::Range;

use super::{dense, par_for, par_row_ranges, par_rows, parallelism, Act, Claims, SendPtr};

/// Per-sample 2-D window geometry (input `[h, w, c]`, output `[oh, ow, ·]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geom {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    /// Padding before the first row / column (the end padding only matters for the
    /// output size, which is already in `oh`/`ow`).
    pub pt: usize,
    pub pl: usize,
}

impl Geom {
    /// Input row index for output row `o` and kernel row `k`, if not in the padding.
    #[inline]
    fn in_row(&self, o: usize, k: usize) -> Option<usize> {
        (o * self.sh + k * self.dh)
            .checked_sub(self.pt)
            .filter(|&i| i < self.h)
    }
    #[inline]
    fn in_col(&self, o: usize, k: usize) -> Option<usize> {
        (o * self.sw + k * self.dw)
            .checked_sub(self.pl)
            .filter(|&i| i < self.w)
    }
    pub fn in_len(&self) -> usize {
        self.h * self.w * self.c
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConvParams {
    pub g: Geom,
    pub cout: usize,
    pub groups: usize,
    pub act: Act,
    /// A max pool over the (activated) output, fused by the executor when the pool
    /// alone reads it (see [`ConvParams::can_fuse_pool`]): its geometry (`h, w, c` the
    /// conv's output); the conv then writes the pooled output only.
    pub pool: Option<Geom>,
}

/// Floats of the im2col matrix one task builds and multiplies at a time (256 KiB):
/// the block is still in L2 when the dense kernel reads it, where a whole-batch im2col
/// matrix (megabytes) went out to memory and back.
const BLOCK_FLOATS: usize = 1 << 16;
/// Rows of a task's block at least (amortises the dense call) and at most.
const BLOCK_ROWS: (usize, usize) = (24, 1024);
/// Rows of the output per task at least, before the rows are split across threads.
const TASK_ROWS: usize = 64;
/// Windows whose contiguous runs are shorter than this (the 1-channel first layer of
/// an image model: runs of 3 floats) are copied into im2col rows, one run of pixels at
/// a time, by [`direct`]: one micro-kernel call per run of the window would each
/// load and store the accumulators for a few multiply-adds.
const DIRECT_MIN_SEG: usize = 16;
/// The gather kernels of [`direct`] take windows of up to this many runs
/// (kernel rows, or taps with column dilation) and this many pixels per call.
const GATHER_MAX_SEGS: usize = 64;
const GATHER_ROWS: usize = 12;
/// Output pixels per block of [`direct`]'s gather path (their outputs stay in L1
/// while every panel of the kernel goes over them).
const GATHER_BLOCK: usize = 128;
/// Output pixels per task of [`direct`] at least.
const DIRECT_TASK_PIXELS: usize = 16;
/// Runs of samples per task that [`direct`]'s tasks claim from a shared counter (the
/// last claim leaves a faster task idle for at most about 1/(2·this) of the layer).
const CLAIMS_PER_TASK: usize = 4;

impl ConvParams {
    pub(crate) fn k_len(&self) -> usize {
        self.g.kh * self.g.kw * (self.g.c / self.groups)
    }
    pub fn is_depthwise(&self) -> bool {
        self.groups == self.g.c && self.groups > 1
    }
    pub fn is_pointwise(&self) -> bool {
        let g = &self.g;
        g.kh == 1
            && g.kw == 1
            && g.sh == 1
            && g.sw == 1
            && g.pt == 0
            && g.pl == 0
            && g.oh == g.h
            && g.ow == g.w
    }
    /// Rows of the im2col matrix per block (a multiple of 24: whole micro-kernel row
    /// blocks of every kernel family).
    pub(crate) fn block_rows(&self) -> usize {
        let (lo, hi) = BLOCK_ROWS;
        (BLOCK_FLOATS / self.k_len().max(1) / 24 * 24).clamp(lo, hi)
    }
    /// Tasks the `rows` output rows are split into.
    fn tasks(rows: usize, threads: usize) -> usize {
        threads.min(rows / TASK_ROWS).max(1)
    }
    /// Scratch floats needed for batches up to `max_batch` on `threads` threads: one
    /// block per task.
    pub fn scratch_len(&self, max_batch: usize, threads: usize) -> usize {
        if self.is_depthwise() || self.is_pointwise() {
            0
        } else {
            let rows = max_batch * self.g.oh * self.g.ow;
            let im2col =
                Self::tasks(rows, threads) * self.block_rows().min(rows.max(1)) * self.k_len();
            // The quantised conv uses the im2col path with the same parameters.
            im2col.max(self.direct_scratch(max_batch, threads))
        }
    }
    /// Whether [`direct`] runs this convolution with the kernel family `isa`: one
    /// group, on the AVX-512 or AVX2 kernels (the portable family multiplies an im2col
    /// matrix with the gemm crate).
    fn direct_ok(&self, isa: dense::Isa) -> bool {
        self.groups == 1 && isa != dense::Isa::Portable && !self.is_pointwise()
    }
    /// Whether the max pool `pg` over this conv's output can be fused into it: the fp32
    /// direct path, an elementwise activation, and non-overlapping windows (stride =
    /// window, no padding or dilation) over exactly this output.
    pub fn can_fuse_pool(&self, pg: &Geom) -> bool {
        let g = &self.g;
        self.pool.is_none()
            && self.direct_ok(dense::isa())
            && !matches!(self.act, Act::Softmax { .. })
            && (pg.h, pg.w, pg.c) == (g.oh, g.ow, self.cout)
            && (pg.sh, pg.sw) == (pg.kh, pg.kw)
            && (pg.dh, pg.dw, pg.pt, pg.pl) == (1, 1, 0, 0)
            && pg.oh >= 1
            && pg.ow >= 1
            && pg.oh * pg.sh <= g.oh
            && pg.ow * pg.sw <= g.ow
    }
    /// Floats of the input window read contiguously: a kernel row (`kw · c`) without
    /// column dilation, else one kernel tap (`c`).
    fn seg_len(&self) -> usize {
        if self.g.dw == 1 {
            self.g.kw * self.g.c
        } else {
            self.g.c
        }
    }
    /// The zero-padded input of one sample that [`direct`] reads: `(rows, cols)`,
    /// just what the output's windows cover.
    fn padded_dims(&self) -> (usize, usize) {
        let g = &self.g;
        let hp = (g.oh.max(1) - 1) * g.sh + (g.kh - 1) * g.dh + 1;
        let wp = (g.ow.max(1) - 1) * g.sw + (g.kw - 1) * g.dw + 1;
        (hp, wp)
    }
    /// Output row groups of one sample in [`direct`]: pooled rows when a pool is
    /// fused (each `kh` conv rows), else conv rows.
    fn row_groups(&self) -> usize {
        self.pool.as_ref().map_or(self.g.oh, |pg| pg.oh)
    }
    /// Tasks of [`direct`] for `batch` samples: row groups are split, with
    /// ≥ `DIRECT_TASK_PIXELS` conv output pixels each.
    fn direct_tasks(&self, batch: usize, threads: usize) -> usize {
        let rows = batch * self.row_groups();
        let pixels = batch * self.g.oh * self.g.ow;
        threads
            .min(pixels / DIRECT_TASK_PIXELS)
            .clamp(1, rows.max(1))
    }
    /// Whether [`direct`] runs the gather kernel for this convolution (`isa`
    /// has it, and a window has at most `GATHER_MAX_SEGS` runs).
    fn gathers(&self, isa: dense::Isa) -> bool {
        dense::has_gather(isa) && self.k_len() / self.seg_len() <= GATHER_MAX_SEGS
    }
    /// How [`direct`] splits `batch` samples between up to `threads` tasks: `(row
    /// parts, column parts)`, each task a range of row groups and of 32-column panels.
    /// Row groups alone as a rule; with the gather kernel, panels too where that
    /// leaves the busiest task less work: the image model's second conv at batch 1 has
    /// 7 pooled rows, 4 + 3 between two threads, and 2 panels, 1 + 1.
    pub(crate) fn direct_split(
        &self,
        isa: dense::Isa,
        batch: usize,
        threads: usize,
    ) -> (usize, usize) {
        let rparts = self.direct_tasks(batch, threads);
        if !self.gathers(isa) {
            return (rparts, 1);
        }
        let rows = batch * self.row_groups();
        let np = self.cout.div_ceil(dense::NR);
        // The busiest task's work, in row groups × panels; ties keep the row split.
        let cost = |(r, c): (usize, usize)| rows.div_ceil(r) * np.div_ceil(c);
        let mut best = (rparts, 1);
        for c in 2..=threads.min(np) {
            let split = (threads / c, c);
            if cost(split) < cost(best) {
                best = split;
            }
        }
        best
    }
    /// Pooled rows whose conv rows [`direct`] computes at a time with a fused pool
    /// (`GATHER_BLOCK` conv pixels where rows allow; one on the non-gather path).
    fn pooled_per_block(&self) -> usize {
        let pix = self.pool.as_ref().map_or(1, |pg| pg.kh * self.g.ow).max(1);
        if dense::has_gather(dense::isa()) {
            (GATHER_BLOCK / pix).max(1)
        } else {
            1
        }
    }
    /// Floats of one task's scratch in [`direct`]: the padded input rows, the conv
    /// rows of one pooled row (with a fused pool), and the im2col rows of one run of
    /// pixels (for short window runs).
    fn direct_task_floats(&self) -> (usize, usize, usize) {
        let (hp, wp) = self.padded_dims();
        let pooled = self.pool.as_ref().map_or(0, |pg| {
            self.pooled_per_block() * pg.kh * self.g.ow * self.cout
        });
        let cols = if self.seg_len() < DIRECT_MIN_SEG {
            dense::isa().rows() * self.k_len()
        } else {
            0
        };
        (hp * wp * self.g.c, pooled, cols)
    }
    fn direct_scratch(&self, max_batch: usize, threads: usize) -> usize {
        let isa = dense::isa();
        if !self.direct_ok(isa) {
            return 0;
        }
        let (a, b, c) = self.direct_task_floats();
        // Every batch's split has at most `threads` tasks; without the gather kernel,
        // at most those of `max_batch` (the row split grows with the batch).
        let tasks = if self.gathers(isa) {
            threads.max(1)
        } else {
            self.direct_tasks(max_batch, threads)
        };
        tasks * (a + b + c)
    }
}

/// `y = act(im2col(x) · kernel)` for a single-group convolution, block by block: the
/// output rows are split between up to `threads` tasks, and each task fills
/// `block_rows` rows of the im2col matrix at a time in its own part of `scratch`, has
/// `gemm(cols, y_rows)` multiply them (one thread) and applies `act` (elementwise) to
/// those rows of `y` while they are in cache.
pub(crate) fn blocked<F: Fn(&[f32], &mut [f32]) + Sync>(
    x: &[f32],
    y: &mut [f32],
    p: &ConvParams,
    scratch: &mut [f32],
    threads: usize,
    act: &Act,
    gemm: &F,
) {
    let g = &p.g;
    let (cout, kl) = (p.cout, p.k_len());
    let rows = y.len() / cout;
    let parts = ConvParams::tasks(rows, threads);
    let br = p.block_rows().min(rows.max(1));
    assert!(p.groups == 1 && scratch.len() >= parts * br * kl);
    let (yp, sp) = (SendPtr(y.as_mut_ptr()), SendPtr(scratch.as_mut_ptr()));
    par_for(parts, &|t| {
        let (a, b) = (rows * t / parts, rows * (t + 1) / parts);
        // SAFETY: task t alone uses scratch block t (parts · br · kl floats asserted
        // above); every task ends before par_for returns, inside our &mut borrow.
        let block = unsafe { std::slice::from_raw_parts_mut(sp.get().add(t * br * kl), br * kl) };
        let mut r0 = a;
        while r0 < b {
            let nr = br.min(b - r0);
            // SAFETY: rows r0..r0+nr lie in this task's range a..b of y (rows × cout
            // floats); the ranges of different tasks are disjoint.
            let yb = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r0 * cout), nr * cout) };
            let cols = &mut block[..nr * kl];
            // The output position of each row, counted on (no divisions per row).
            let (mut n, mut oh, mut ow) = (r0 / (g.oh * g.ow), (r0 / g.ow) % g.oh, r0 % g.ow);
            for row in cols.chunks_exact_mut(kl) {
                fill_at(x, row, n, oh, ow, 0, g.c, g);
                ow += 1;
                if ow == g.ow {
                    ow = 0;
                    oh += 1;
                    if oh == g.oh {
                        oh = 0;
                        n += 1;
                    }
                }
            }
            gemm(cols, yb);
            act.apply(yb);
            r0 += nr;
        }
    });
}

/// `y[batch, oh, ow, cout] = conv(x[batch, h, w, c], kernel[kh, kw, c/groups, cout]) + bias`.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    x: &[f32],
    kernel: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    batch: usize,
    p: &ConvParams,
    scratch: &mut [f32],
    threads: usize,
) {
    let g = &p.g;
    let cout = p.cout;
    let rows = batch * g.oh * g.ow;
    let cing = g.c / p.groups;
    let coutg = cout / p.groups;
    assert!(kernel.len() >= g.kh * g.kw * cing * cout && bias.is_none_or(|b| b.len() >= cout));
    if p.pool.is_some() {
        // Fused only where `can_fuse_pool` held: the direct path, elementwise act.
        direct(
            dense::isa(),
            x,
            kernel,
            bias,
            y,
            batch,
            p,
            scratch,
            threads,
            &p.act,
        );
        return;
    }
    assert!(x.len() >= batch * g.in_len() && y.len() >= rows * cout);
    let y = &mut y[..rows * cout];
    if p.groups == 1 {
        // The dense kernel writes `cols · kernel + bias` itself; an elementwise
        // activation is applied by each thread to its rows while they are in cache.
        let fused = !matches!(p.act, Act::Softmax { .. });
        let act = if fused { &p.act } else { &Act::Linear };
        if p.is_pointwise() {
            gemm_rows(&x[..rows * g.c], kernel, bias, act, y, g.c, cout, threads);
        } else if p.direct_ok(dense::isa())
            && (dense::has_gather(dense::isa()) || p.seg_len() < DIRECT_MIN_SEG)
        {
            // Without a gather kernel, long window runs multiply im2col blocks a
            // little faster than strided calls per run (AVX2 before it had one: 3×3×64
            // → 64 at batch 16, 1 thread: 0.70 against 0.77 ms).
            direct(
                dense::isa(),
                x,
                kernel,
                bias,
                y,
                batch,
                p,
                scratch,
                threads,
                act,
            );
        } else {
            let kl = p.k_len();
            blocked(x, y, p, scratch, threads, act, &|cols, yb| {
                let m = yb.len() / cout;
                dense::dense(cols, dense::Kernel::Rows(kernel), bias, yb, m, kl, cout, 1);
            });
        }
        if !fused {
            p.act.apply(y);
        }
        return;
    }
    match bias {
        Some(b) => y
            .chunks_exact_mut(cout)
            .for_each(|r| r.copy_from_slice(&b[..cout])),
        None => y.fill(0.0),
    }
    if p.is_depthwise() {
        depthwise(x, kernel, y, batch, p, threads);
    } else if p.is_pointwise() {
        // Grouped: each group's columns of y, with the gemm crate (strided output).
        for gi in 0..p.groups {
            // SAFETY: x is rows×c, kernel c/groups × cout and y rows×cout (asserted
            // above); the group's column offsets stay within a row; y is a distinct
            // &mut borrow so it does not alias x or kernel.
            unsafe {
                gemm::gemm(
                    rows,
                    coutg,
                    cing,
                    y.as_mut_ptr().add(gi * coutg),
                    1,
                    cout as isize,
                    true,
                    x.as_ptr().add(gi * cing),
                    1,
                    g.c as isize,
                    kernel.as_ptr().add(gi * coutg),
                    1,
                    cout as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    parallelism(threads),
                )
            }
        }
    } else {
        let kl = p.k_len();
        // Blocks of the im2col matrix as large as the scratch (one per task) allows.
        let chunk = (scratch.len() / kl.max(1)).clamp(1, rows.max(1));
        for gi in 0..p.groups {
            let mut r0 = 0;
            while r0 < rows {
                let nr = chunk.min(rows - r0);
                let cols = &mut scratch[..nr * kl];
                im2col(x, cols, r0, gi * cing, cing, g, threads);
                // SAFETY: cols is nr×kl; the kernel group block is kl×coutg with row
                // stride cout inside kernel (asserted length); y rows r0..r0+nr and
                // the group's columns lie inside y; no aliasing between the three.
                unsafe {
                    gemm::gemm(
                        nr,
                        coutg,
                        kl,
                        y.as_mut_ptr().add(r0 * cout + gi * coutg),
                        1,
                        cout as isize,
                        true,
                        cols.as_ptr(),
                        1,
                        kl as isize,
                        kernel.as_ptr().add(gi * coutg),
                        1,
                        cout as isize,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        parallelism(threads),
                    )
                }
                r0 += nr;
            }
        }
    }
    p.act.apply(y);
}

/// A single-group convolution without an im2col matrix. Tasks own ranges of output
/// rows (and, with the gather kernel at small batches, of 32-column panels: see
/// [`ConvParams::direct_split`]). Each task zero-pads the input rows its output rows
/// read (one sample at a time) into its part of `scratch`;
/// then the windows of a run of consecutive output pixels in one output row are rows
/// `sw · c` floats apart of that padded input, and every contiguous run of a window
/// (a kernel row of `kw · c` floats, or one tap of `c` with column dilation) is one
/// strided micro-kernel call over those pixels ([`dense::strided_rows`]), the later runs
/// adding to the first. Windows of short runs are copied into im2col rows for one run
/// of pixels instead (see `DIRECT_MIN_SEG`). `act` (elementwise) is applied to each
/// output row in cache; with a fused max pool (`p.pool`), the conv rows of one pooled
/// row go to the task's scratch and only their pooled maxima to `y`.
#[allow(clippy::too_many_arguments)]
fn direct(
    isa: dense::Isa,
    x: &[f32],
    kernel: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    batch: usize,
    p: &ConvParams,
    scratch: &mut [f32],
    threads: usize,
    act: &Act,
) {
    let g = &p.g;
    let (c, cout, kl) = (g.c, p.cout, p.k_len());
    let (_, wp) = p.padded_dims();
    let (pad_len, pool_len, cols_len) = p.direct_task_floats();
    let task_len = pad_len + pool_len + cols_len;
    let (rparts, cparts) = p.direct_split(isa, batch, threads);
    let parts = rparts * cparts;
    let np = cout.div_ceil(dense::NR);
    let ngroups = p.row_groups();
    let groups = batch * ngroups;
    // Conv rows per group and the step between groups; the output row of a group.
    let (grows, gstep, out_row) = match &p.pool {
        Some(pg) => (pg.kh, pg.sh, pg.ow * cout),
        None => (1, 1, g.ow * cout),
    };
    let seg = p.seg_len();
    let nseg = kl / seg;
    let im2col = seg < DIRECT_MIN_SEG;
    let gather = p.gathers(isa);
    // Input offset (in the padded sample) and kernel row of segment s.
    let seg_at = |s: usize| -> (usize, usize) {
        let (ki, kj) = if g.dw == 1 {
            (s, 0)
        } else {
            (s / g.kw, s % g.kw)
        };
        ((ki * g.dh * wp + kj * g.dw) * c, s * seg)
    };
    // Output pixels per micro-kernel call: runs of near-equal length (a 28-wide row as
    // 10 + 9 + 9 rather than 12 + 12 + 4).
    let step = isa.rows();
    let runs = g.ow.div_ceil(step).max(1);
    assert!(scratch.len() >= parts * task_len && y.len() >= groups * out_row);
    assert!(kernel.len() >= kl * cout && x.len() >= batch * g.in_len());
    // With a row split over at least two samples per task, the tasks claim runs of
    // samples as they go (`Claims`) instead of a fixed share each. Each task pads
    // each sample's rows on its own anyway, so the claims cost no extra padding.
    let claims = (cparts == 1 && rparts > 1 && batch >= 2 * rparts)
        .then(|| Claims::new(batch, rparts * CLAIMS_PER_TASK));
    let (yp, sp) = (SendPtr(y.as_mut_ptr()), SendPtr(scratch.as_mut_ptr()));
    par_for(parts, &|t| {
        let (rt, ct) = (t / cparts, t % cparts);
        // This task's output channels: whole panels (all of them without a column
        // split, which only the gather path makes).
        let chans = np * ct / cparts * dense::NR..(np * (ct + 1) / cparts * dense::NR).min(cout);
        // SAFETY: task t alone uses scratch block t (parts · task_len floats, asserted
        // above); every task ends before par_for returns, inside our &mut borrow.
        let mine = unsafe { std::slice::from_raw_parts_mut(sp.get().add(t * task_len), task_len) };
        let (pad, rest) = mine.split_at_mut(pad_len);
        let (pooled, cols) = rest.split_at_mut(pool_len);
        // One conv output row (n, oh) into `dst` (ow · cout floats), activated.
        let conv_row = |pad: &[f32], cols: &mut [f32], pr0: usize, oh: usize, dst: &mut [f32]| {
            let xrow = &pad[(oh * g.sh - pr0) * wp * c..];
            let yd = dst.as_mut_ptr();
            if im2col {
                for run in 0..runs {
                    let (o0, o1) = (g.ow * run / runs, g.ow * (run + 1) / runs);
                    let cols = &mut cols[..(o1 - o0) * kl];
                    for (j, row) in cols.chunks_exact_mut(kl).enumerate() {
                        let at = (o0 + j) * g.sw * c;
                        for (s, part) in row.chunks_exact_mut(seg).enumerate() {
                            copy(part, &xrow[at + seg_at(s).0..][..seg]);
                        }
                    }
                    // SAFETY: pixels o0..o1 of dst, cout floats each, are ours (dst
                    // is an exclusive borrow).
                    unsafe {
                        dense::strided_rows(
                            isa,
                            cols,
                            o1 - o0,
                            kl,
                            kl,
                            kernel,
                            cout,
                            cout,
                            bias,
                            false,
                            yd.add(o0 * cout),
                            cout,
                        )
                    };
                }
            } else {
                // Panel by panel, then window run by run: one panel's block of the
                // kernel (kc × 32) serves every pixel of the row from L1, where the
                // whole kernel (72 KiB for 3×3×32→64) does not fit.
                for c0 in (0..cout).step_by(dense::NR) {
                    let nc = dense::NR.min(cout - c0);
                    for s in 0..nseg {
                        let (xo, ko) = seg_at(s);
                        let ks = &kernel[ko * cout + c0..(ko + seg) * cout];
                        for run in 0..runs {
                            let (o0, o1) = (g.ow * run / runs, g.ow * (run + 1) / runs);
                            let xs = &xrow[o0 * g.sw * c + xo..];
                            // SAFETY: pixels o0..o1 of dst, columns c0..c0+nc, are
                            // ours (dst is an exclusive borrow).
                            unsafe {
                                dense::strided_rows(
                                    isa,
                                    xs,
                                    o1 - o0,
                                    g.sw * c,
                                    seg,
                                    ks,
                                    cout,
                                    nc,
                                    bias.map(|b| &b[c0..]),
                                    s > 0,
                                    yd.add(o0 * cout + c0),
                                    cout,
                                )
                            };
                        }
                    }
                }
            }
            act.apply(dst);
        };
        // With the gather kernel (AVX-512, AVX2): conv rows oh0..oh0+nrows into `dst`
        // (nrows · ow · cout floats), activated. Pixels go through the kernel in runs
        // of near-equal length (up to 12 on AVX-512, 6 over a double panel or on
        // AVX2) across output rows, each reading its whole window from the padded
        // input; panel by panel, so one panel's block of the kernel serves all of them
        // from cache.
        let mut segs = [0usize; GATHER_MAX_SEGS];
        for (s, o) in segs.iter_mut().enumerate().take(nseg.min(GATHER_MAX_SEGS)) {
            *o = seg_at(s).0;
        }
        let segs = &segs[..nseg.min(GATHER_MAX_SEGS)];
        // A ReLU is applied by the gather kernel as it stores.
        let relu = *act == Act::Relu;
        // `dst`: the conv rows' first pixel (rows of `cout` floats); the task writes
        // their channels `chans` only.
        let gather_rows = |pad: &[f32], pr0: usize, oh0: usize, nrows: usize, dst: *mut f32| {
            let pix = nrows * g.ow;
            let mut c0 = chans.start;
            while c0 < chans.end {
                // Two panels at a time where the task has them, on AVX-512: each
                // broadcast input then feeds four FMAs instead of two (the image
                // model's 3×3 convs at batch 64, one thread: 1.09× and 1.12×).
                let left = chans.end - c0;
                let wide = isa == dense::Isa::Avx512 && left > dense::NR;
                let nc = left.min(if wide { 2 * dense::NR } else { dense::NR });
                let step = if wide { dense::WIDE_ROWS } else { step };
                let chunks = pix.div_ceil(step);
                for ch in 0..chunks {
                    let (q0, q1) = (pix * ch / chunks, pix * (ch + 1) / chunks);
                    let mut ptrs = [std::ptr::null::<f32>(); GATHER_ROWS];
                    let (mut oh, mut ow) = (oh0 + q0 / g.ow, q0 % g.ow);
                    for p in ptrs[..q1 - q0].iter_mut() {
                        *p = pad[((oh * g.sh - pr0) * wp + ow * g.sw) * c..].as_ptr();
                        ow += 1;
                        if ow == g.ow {
                            ow = 0;
                            oh += 1;
                        }
                    }
                    // SAFETY: each pixel's window (its segments) lies inside the
                    // padded rows pr0.. that `pad_rows` filled (the geometry of
                    // `padded_dims`); pixels q0..q1 of dst, columns c0..c0+nc (inside
                    // `chans`), are this task's alone (the caller's contract).
                    unsafe {
                        dense::gather_rows(
                            &ptrs[..q1 - q0],
                            segs,
                            seg,
                            &kernel[c0..],
                            cout,
                            nc,
                            bias.map(|b| &b[c0..]),
                            dst.add(q0 * cout + c0),
                            cout,
                            relu,
                        )
                    };
                }
                c0 += nc;
            }
            if !relu && chans.len() == cout {
                // SAFETY: every channel of these pixels is this task's (as above).
                act.apply(unsafe { std::slice::from_raw_parts_mut(dst, pix * cout) });
            } else if !relu {
                for q in 0..pix {
                    // SAFETY: channels `chans` of pixel q are this task's (as above).
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(dst.add(q * cout + chans.start), chans.len())
                    };
                    act.apply(out);
                }
            }
        };
        // Row groups a..b (whole samples when claimed).
        let mut run_groups = |a: usize, b: usize| {
            let mut r = a;
            while r < b {
                // This task's row groups ga..gb of sample n, the conv rows they need and
                // the padded rows those read.
                let n = r / ngroups;
                let (ga, gb) = (r % ngroups, (b - n * ngroups).min(ngroups));
                let (ca, cb) = (ga * gstep, (gb - 1) * gstep + grows);
                let (pr0, pr1) = (ca * g.sh, (cb - 1) * g.sh + (g.kh - 1) * g.dh + 1);
                pad_rows(&x[n * g.in_len()..][..g.in_len()], pad, pr0, pr1, wp, g);
                // With a pool and the gather kernel, `per` pooled rows at a time (their conv
                // rows are consecutive: stride = window), so that runs of pixels are long.
                let per = if gather { p.pooled_per_block() } else { 1 };
                let mut gi = ga;
                while gi < gb {
                    let ng = per.min(gb - gi);
                    // Output row groups (n, gi..gi+ng): in this task's groups a..b of y
                    // (groups · out_row floats, asserted above); the tasks' ranges of groups
                    // and channels are disjoint.
                    // SAFETY: the offset stays inside y (see above).
                    let ydst = unsafe { yp.get().add((n * ngroups + gi) * out_row) };
                    let Some(pg) = &p.pool else {
                        if !gather {
                            // SAFETY: the rows are this task's alone: without the gather
                            // kernel, tasks split row groups only (`direct_split`).
                            let yrows =
                                unsafe { std::slice::from_raw_parts_mut(ydst, ng * out_row) };
                            conv_row(pad, cols, pr0, gi, yrows);
                        }
                        gi += ng;
                        continue;
                    };
                    let rl = g.ow * cout;
                    let conv_rows = &mut pooled[..ng * grows * rl];
                    if gather {
                        gather_rows(pad, pr0, gi * gstep, ng * grows, conv_rows.as_mut_ptr());
                    } else {
                        for (k, dst) in conv_rows.chunks_exact_mut(rl).enumerate() {
                            conv_row(pad, cols, pr0, gi * gstep + k, dst);
                        }
                    }
                    for (k, rows) in conv_rows.chunks_exact(grows * rl).enumerate() {
                        // SAFETY: pooled row k of these groups, channels `chans`, is this
                        // task's (see above).
                        unsafe {
                            max_pool_rows(rows, ydst.add(k * out_row), pg, cout, chans.clone())
                        };
                    }
                    gi += ng;
                }
                if gather && p.pool.is_none() {
                    // Blocks of whole conv rows, ≤ GATHER_BLOCK pixels each where a row allows.
                    let per = (GATHER_BLOCK / g.ow.max(1)).max(1);
                    let mut oh = ga;
                    while oh < gb {
                        let nr = per.min(gb - oh);
                        let at = (n * g.oh + oh) * g.ow * cout;
                        // SAFETY: conv rows oh..oh+nr of sample n lie in this task's rows
                        // a..b of y (no pool: groups are conv rows); with its channels
                        // `chans`, disjoint between tasks.
                        gather_rows(pad, pr0, oh, nr, unsafe { yp.get().add(at) });
                        oh += nr;
                    }
                }
                r = n * ngroups + gb;
            }
        };
        match &claims {
            None => run_groups(groups * rt / rparts, groups * (rt + 1) / rparts),
            Some(c) => {
                while let Some(samples) = c.take() {
                    run_groups(samples.start * ngroups, samples.end * ngroups);
                }
            }
        }
    });
}

/// One row of a non-overlapping max pool (`pg`: window = stride, no padding) over the
/// `pg.kh` conv rows in `rows` (each `pg.w · c` floats) into `out` (`pg.ow` pixels of
/// `c` floats), channels `chans` only.
///
/// # Safety
/// `out` must be valid for writes of `pg.ow · c` floats, and channels `chans` of its
/// pixels touched by nobody else during the call.
unsafe fn max_pool_rows(rows: &[f32], out: *mut f32, pg: &Geom, c: usize, chans: Range<usize>) {
    let rl = pg.w * c;
    let (c0, nc) = (chans.start, chans.len());
    assert!(chans.end <= c && rows.len() >= pg.kh * rl);
    // NaN propagates like `pool`'s max (branch-free, so it vectorises).
    let mx = |a: f32, b: f32| if (b > a) | b.is_nan() { b } else { a };
    for pw in 0..pg.ow {
        // SAFETY: pixel pw's channels `chans` lie inside `out` (the caller's contract).
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(pw * c + c0), nc) };
        let at = pw * pg.sw * c + c0;
        if (pg.kh, pg.kw) == (2, 2) {
            // The common 2×2 window in one pass.
            let (a, b) = (&rows[at..at + nc], &rows[at + c..at + c + nc]);
            let (d, e) = (
                &rows[rl + at..rl + at + nc],
                &rows[rl + at + c..rl + at + c + nc],
            );
            for j in 0..nc {
                o[j] = mx(mx(a[j], b[j]), mx(d[j], e[j]));
            }
            continue;
        }
        o.copy_from_slice(&rows[at..at + nc]);
        for ki in 0..pg.kh {
            for kj in 0..pg.kw {
                if ki + kj == 0 {
                    continue;
                }
                let v = &rows[ki * rl + at + kj * c..][..nc];
                for (a, &b) in o.iter_mut().zip(v) {
                    *a = mx(*a, b);
                }
            }
        }
    }
}

/// Padded rows `pr0..pr1` (`wp` columns) of one sample `xs` into `pad`, from its row 0:
/// the input where it lies (offset by the padding before), zeros elsewhere.
fn pad_rows(xs: &[f32], pad: &mut [f32], pr0: usize, pr1: usize, wp: usize, g: &Geom) {
    let c = g.c;
    // Input columns that land inside the padded width.
    let cols = g.w.min(wp.saturating_sub(g.pl));
    for (i, prow) in pad[..(pr1 - pr0) * wp * c]
        .chunks_exact_mut(wp * c)
        .enumerate()
    {
        let Some(ih) = (pr0 + i).checked_sub(g.pt).filter(|&ih| ih < g.h) else {
            prow.fill(0.0);
            continue;
        };
        let lo = g.pl.min(wp) * c;
        prow[..lo].fill(0.0);
        prow[lo..lo + cols * c].copy_from_slice(&xs[ih * g.w * c..][..cols * c]);
        prow[lo + cols * c..].fill(0.0);
    }
}

/// `y = act(cols · kernel + bias)` for the `rows × kl` matrix `cols` (`kernel`:
/// `kl × cout`, row-major; `act` elementwise), with the dense micro-kernel. Rows are
/// split across threads: the dense kernel's own split is by output columns, and a
/// convolution has few output channels but many rows.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    cols: &[f32],
    kernel: &[f32],
    bias: Option<&[f32]>,
    act: &Act,
    y: &mut [f32],
    kl: usize,
    cout: usize,
    threads: usize,
) {
    let rows = y.len() / cout;
    let parts = threads.min(rows / 64).max(1);
    par_row_ranges(y, cout, parts, &|first, yr| {
        let m = yr.len() / cout;
        let xs = &cols[first * kl..(first + m) * kl];
        dense::dense(xs, dense::Kernel::Rows(kernel), bias, yr, m, kl, cout, 1);
        act.apply(yr);
    });
}

/// Fill `cols` (rows r0.. of the im2col matrix, `kh*kw*cing` wide) for channels
/// `c0..c0+cing`, rows split across threads.
pub(crate) fn im2col(
    x: &[f32],
    cols: &mut [f32],
    r0: usize,
    c0: usize,
    cing: usize,
    g: &Geom,
    threads: usize,
) {
    let kl = g.kh * g.kw * cing;
    // Rows are short: split only when there are enough of them.
    let parts = if cols.len() / kl < 64 { 1 } else { threads };
    par_rows(cols, kl, parts, &|ri, row| {
        fill_row(x, row, r0 + ri, c0, cing, g)
    });
}

/// Row `r` of the im2col matrix (channels `c0..c0+cing`).
fn fill_row(x: &[f32], row: &mut [f32], r: usize, c0: usize, cing: usize, g: &Geom) {
    let (n, oh, ow) = (r / (g.ow * g.oh), (r / g.ow) % g.oh, r % g.ow);
    fill_at(x, row, n, oh, ow, c0, cing, g);
}

/// The im2col row of output position `(n, oh, ow)`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn fill_at(
    x: &[f32],
    row: &mut [f32],
    n: usize,
    oh: usize,
    ow: usize,
    c0: usize,
    cing: usize,
    g: &Geom,
) {
    let xs = &x[n * g.in_len()..][..g.in_len()];
    // Without dilation and with all channels, the kernel columns that fall inside
    // the image read one contiguous run of the input row: one copy per kernel row.
    let runs = g.dw == 1 && cing == g.c;
    for ki in 0..g.kh {
        let ih = g.in_row(oh, ki);
        if runs {
            let seg = &mut row[ki * g.kw * cing..][..g.kw * cing];
            let Some(ih) = ih else {
                seg.fill(0.0);
                continue;
            };
            let start = ow * g.sw; // input column of kernel column 0, plus pl
            let lo = g.pl.saturating_sub(start).min(g.kw);
            let hi = (g.w + g.pl).saturating_sub(start).min(g.kw).max(lo);
            seg[..lo * cing].fill(0.0);
            if hi > lo {
                let iw = start + lo - g.pl;
                copy(
                    &mut seg[lo * cing..hi * cing],
                    &xs[(ih * g.w + iw) * g.c..][..(hi - lo) * cing],
                );
            }
            seg[hi * cing..].fill(0.0);
            continue;
        }
        for kj in 0..g.kw {
            let dst = &mut row[(ki * g.kw + kj) * cing..][..cing];
            match (ih, g.in_col(ow, kj)) {
                (Some(ih), Some(iw)) => copy(dst, &xs[(ih * g.w + iw) * g.c + c0..][..cing]),
                _ => dst.fill(0.0),
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, without a `memcpy` call for the few floats of a
/// convolution over one or two channels.
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32]) {
    if dst.len() <= 8 {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// Depthwise conv (groups == c): output channel `o` reads input channel `o / mult`.
fn depthwise(
    x: &[f32],
    kernel: &[f32],
    y: &mut [f32],
    batch: usize,
    p: &ConvParams,
    threads: usize,
) {
    let g = &p.g;
    let cout = p.cout;
    let mult = cout / g.c;
    let out_rows = batch * g.oh;
    let row_len = g.ow * cout;
    let one_row = |r: usize, yrow: &mut [f32]| {
        let n = r / g.oh;
        let oh = r % g.oh;
        let xs = &x[n * g.in_len()..][..g.in_len()];
        for ki in 0..g.kh {
            let Some(ih) = g.in_row(oh, ki) else { continue };
            for ow in 0..g.ow {
                let out = &mut yrow[ow * cout..][..cout];
                for kj in 0..g.kw {
                    let Some(iw) = g.in_col(ow, kj) else { continue };
                    let xin = &xs[(ih * g.w + iw) * g.c..][..g.c];
                    let kv = &kernel[(ki * g.kw + kj) * cout..][..cout];
                    if mult == 1 {
                        for ((o, &a), &b) in out.iter_mut().zip(xin).zip(kv) {
                            *o += a * b;
                        }
                    } else {
                        for (o, (ov, &kk)) in out.iter_mut().zip(kv).enumerate() {
                            *ov += xin[o / mult] * kk;
                        }
                    }
                }
            }
        }
    };
    par_rows(&mut y[..out_rows * row_len], row_len, threads, &one_row);
}

/// Window pooling: `y[batch, oh, ow, c]`.
pub fn pool(
    x: &[f32],
    y: &mut [f32],
    batch: usize,
    g: &Geom,
    max: bool,
    count_include_pad: bool,
    threads: usize,
) {
    let c = g.c;
    assert!(x.len() >= batch * g.in_len() && y.len() >= batch * g.oh * g.ow * c);
    // Output rows (sample, oh) are split across threads; ≥ ~16k outputs per task.
    let rows = batch * g.oh;
    let parts = threads.clamp(1, (rows * g.ow * c / 16384).clamp(1, rows.max(1)));
    par_rows(&mut y[..rows * g.ow * c], g.ow * c, parts, &|r, yrow| {
        let (n, oh) = (r / g.oh, r % g.oh);
        let xs = &x[n * g.in_len()..][..g.in_len()];
        for (ow, out) in yrow.chunks_exact_mut(c).enumerate() {
            out.fill(if max { f32::NEG_INFINITY } else { 0.0 });
            let mut count = 0usize;
            for ki in 0..g.kh {
                let Some(ih) = g.in_row(oh, ki) else { continue };
                for kj in 0..g.kw {
                    let Some(iw) = g.in_col(ow, kj) else { continue };
                    count += 1;
                    let xin = &xs[(ih * g.w + iw) * c..][..c];
                    if max {
                        for (o, &v) in out.iter_mut().zip(xin) {
                            // NaN propagates like numpy's max. Written as a
                            // branch-free select (`|`, not `||`) so it vectorises.
                            *o = if (v > *o) | v.is_nan() { v } else { *o };
                        }
                    } else {
                        for (o, &v) in out.iter_mut().zip(xin) {
                            *o += v;
                        }
                    }
                }
            }
            if !max {
                let d = if count_include_pad {
                    g.kh * g.kw
                } else {
                    count
                };
                let r = 1.0 / d as f32;
                out.iter_mut().for_each(|o| *o *= r);
            }
        }
    });
}

/// Reduce `[batch, s, c]` over `s`.
pub fn global_pool(x: &[f32], y: &mut [f32], batch: usize, s: usize, c: usize, max: bool) {
    assert!(x.len() >= batch * s * c && y.len() >= batch * c);
    for n in 0..batch {
        let out = &mut y[n * c..][..c];
        out.fill(if max { f32::NEG_INFINITY } else { 0.0 });
        for row in x[n * s * c..][..s * c].chunks_exact(c) {
            if max {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = if (v > *o) | v.is_nan() { v } else { *o };
                }
            } else {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
        if !max {
            let r = 1.0 / s as f32;
            out.iter_mut().for_each(|o| *o *= r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3×3 "same" convolution `h × w × c → cout`, optionally with a fused
    /// non-overlapping `pool × pool` max pool.
    fn same3(h: usize, w: usize, c: usize, cout: usize, pool: Option<usize>) -> ConvParams {
        let g = Geom {
            h,
            w,
            c,
            oh: h,
            ow: w,
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
            dh: 1,
            dw: 1,
            pt: 1,
            pl: 1,
        };
        let pool = pool.map(|k| Geom {
            h,
            w,
            c: cout,
            oh: h / k,
            ow: w / k,
            kh: k,
            kw: k,
            sh: k,
            sw: k,
            dh: 1,
            dw: 1,
            pt: 0,
            pl: 0,
        });
        ConvParams {
            g,
            cout,
            groups: 1,
            act: Act::Relu,
            pool,
        }
    }

    #[test]
    fn few_rows_split_panels() {
        // The shapes of tests/ops.rs that are meant to take the panel split.
        let isa = dense::isa();
        let cases = [
            (same3(7, 7, 64, 64, None), 1, 2, (1, 2)),
            (same3(5, 6, 8, 70, None), 1, 3, (1, 3)),
            (same3(14, 14, 32, 64, Some(2)), 1, 2, (1, 2)),
            (same3(10, 9, 8, 70, Some(2)), 1, 3, (1, 3)),
            (same3(9, 9, 8, 40, Some(3)), 1, 2, (1, 2)),
            // Enough rows to split evenly: rows only.
            (same3(14, 14, 32, 64, Some(2)), 2, 2, (2, 1)),
            (same3(28, 28, 1, 32, Some(2)), 1, 2, (2, 1)),
        ];
        for (p, batch, threads, want) in cases {
            let got = p.direct_split(isa, batch, threads);
            if dense::has_gather(isa) {
                assert_eq!(got, want, "{:?} batch {batch}", p.g);
            } else {
                assert_eq!(got.1, 1, "no panel split without the gather kernel");
            }
            // Never more tasks than the scratch was planned for.
            assert!(got.0 * got.1 <= threads);
        }
    }
}
