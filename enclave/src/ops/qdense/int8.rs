//! int8 products with dynamic activation quantisation (`panels32x4` kernels).
//!
//! Each row of `x` (a dense input row, or one im2col row of a conv) is quantised on
//! the fly, symmetrically: `amax = max|x|`, `inv = 127 / amax` and
//! `qx = round_half_even(x · inv)` clipped to ±127, all in float32, and its scale is
//! `sx = amax / 127` (a row of zeros: `sx = 0`; a NaN or infinite input: `sx = NaN`,
//! so the row's outputs are NaN as in float32). The products of `qx` and the int8
//! weights are summed exactly in int32 and `y = acc · (sx · sw[col]) + bias`. The
//! numpy reference executor quantises the same way (python/ennclave/reference.py),
//! so the two agree up to the final float32 rounding.
//!
//! Symmetric signed activations rather than u8 with a zero point: AMX multiplies
//! signed by signed (`tdpbssd`) as they are, and the scale is one division per row.
//! The VNNI instructions multiply unsigned by signed (`vpdpbusd`), so those kernels
//! store `qx + 128` (a flipped sign bit) and subtract `128 · Σ_k w[k, col]`, which
//! they sum with the same instruction (AVX-512: alongside, one more per weight load;
//! AVX-VNNI, short of registers: once per panel).
//!
//! Kernels, best first: AMX-INT8 tiles (blocks of up to 32 rows), AVX-512 VNNI
//! (12 rows), AVX-VNNI on 256-bit registers (3 rows), AVX2 without VNNI (2 rows:
//! `vpmaddubsw` on the absolute activations and sign-moved weights, [`madd256`]), and
//! a portable one in plain Rust. For AMX the rows are
//! quantised straight into tile order ([`QLayout`]), and a panel computed for more
//! than 32 rows is taken in k-blocks of 512 inputs, each block of 32 rows in turn with
//! its partial sums kept in tiles' memory between blocks, so the second row block
//! reads the panel's k-block from L1 instead of L2 ([`AMX_KQB`]); a ReLU is applied
//! in the final scaling store (AVX-512 for the AVX-512 kernels).

use std::sync::atomic::Ordering;

use super::{Path, AMX_MIN_ROWS, MR, MR_PORTABLE, NR, RB};
use crate::ops::{par_for, SendPtr};

/// A pointer that tasks of one `par_for` share, each using its own part.
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
// SAFETY: only used to hand disjoint parts of one buffer to par_for's tasks, which all
// end before the buffer's borrow does.
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as for Send.
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    /// The pointer (a method, so closures capture the whole wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Rows per AVX-VNNI (256-bit) call: 4 accumulators and a broadcast per row.
const MR_VNNI256: usize = 3;
/// Rows per AVX2 call without VNNI ([`madd256`]): 4 accumulators, the broadcast quad
/// and its absolute value per row.
const MR_MADD256: usize = 2;

/// The int8 kernel that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    Portable,
    /// AVX2 without VNNI: `vpmaddubsw` + `vpmaddwd` ([`madd256`]).
    Madd256,
    Vnni256,
    Vnni512,
    Amx,
}

impl Kernel {
    /// The kernel for `path` and `m` rows on this CPU.
    pub(super) fn choose(path: Path, m: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if path == Path::Amx && m >= AMX_MIN_ROWS && super::AMX_INT8.load(Ordering::Relaxed) {
                return Kernel::Amx;
            }
            if path >= Path::Avx512 && has!("avx512vnni") {
                return Kernel::Vnni512;
            }
            if path >= Path::Avx2 {
                if has!("avxvnni") {
                    return Kernel::Vnni256;
                }
                return Kernel::Madd256;
            }
        }
        let _ = (path, m);
        Kernel::Portable
    }

    /// Rows per micro-kernel call.
    fn rows(self) -> usize {
        match self {
            Kernel::Amx => 32,
            Kernel::Vnni512 => MR,
            Kernel::Vnni256 => MR_VNNI256,
            Kernel::Madd256 => MR_MADD256,
            Kernel::Portable => MR_PORTABLE,
        }
    }

    /// The VNNI kernels read `qx + 128`.
    pub(super) fn unsigned(self) -> bool {
        matches!(self, Kernel::Vnni256 | Kernel::Vnni512)
    }
}

/// Quads (u32: 4 int8 values, the first in the low byte) per quantised row: `k / 4`
/// rounded up to 16, as AMX tiles read 64 bytes per row, and to an odd multiple of
/// 16 so that the 16 rows of a tile do not fall into a few L1 sets (a stride of
/// 2 KiB would map them to 2 of its 64).
fn row_quads(k: usize) -> usize {
    (k.div_ceil(64) | 1) * 16
}

/// Where the quantised rows lie (in u32 quads): quad `j` of row `i` is at
/// `(i / 16) · ts + (i % 16) · lda + (j / 16) · gs + j % 16`, every row padded with
/// the value 0 to `groups` groups of 16 quads (64 inputs).
///
/// * Rows one after another ([`QLayout::rows`]): `lda` quads per row, `gs = 16`,
///   `ts = 16 · lda`; the VNNI and portable kernels read these.
/// * AMX tile order ([`QLayout::tiles`]): each 16 rows × 64 inputs (one A tile) is
///   one contiguous KiB, the groups of a tile one after another, so the kernel's A
///   loads stream sequentially instead of touching 16 rows 2 KiB apart.
#[derive(Clone, Copy, Debug)]
pub(super) struct QLayout {
    pub lda: usize,
    pub gs: usize,
    pub ts: usize,
}

impl QLayout {
    pub(super) fn rows(k: usize) -> QLayout {
        let lda = row_quads(k);
        QLayout {
            lda,
            gs: 16,
            ts: 16 * lda,
        }
    }

    pub(super) fn tiles(k: usize) -> QLayout {
        let groups = k.div_ceil(64).max(1);
        QLayout {
            lda: 16,
            gs: 256,
            ts: groups * 256,
        }
    }

    /// Groups of 64 inputs per row.
    fn groups(self, k: usize) -> usize {
        k.div_ceil(64).max(1)
    }

    /// Where row `i` starts.
    fn row(self, i: usize) -> usize {
        i / 16 * self.ts + i % 16 * self.lda
    }

    /// Quads a buffer of `rows` rows needs.
    pub(super) fn len(self, rows: usize, k: usize) -> usize {
        if rows == 0 {
            return 0;
        }
        self.row(rows - 1) + (self.groups(k) - 1) * self.gs + 16
    }
}

/// The byte of input `e` of a row, `gsb` bytes between its groups of 64.
#[inline(always)]
fn pos(e: usize, gsb: usize) -> usize {
    (e >> 6) * gsb + (e & 63)
}

/// Quantise one row of `x` into the bytes of `d` (`qx`, or `qx + 128` when
/// `unsigned`, padded with the value of 0 to `groups` groups of 64 inputs placed
/// `gsb` bytes apart); returns the row's scale (module doc).
#[inline(always)]
fn quantise_row(x: &[f32], d: &mut [u8], gsb: usize, groups: usize, unsigned: bool) -> f32 {
    let zero = if unsigned { 0x80u8 } else { 0 };
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let nan = x.iter().fold(false, |a, v| a | v.is_nan());
    let bad = amax == 0.0 || !amax.is_finite() || nan;
    let inv = 127.0 / amax;
    for e in 0..groups * 64 {
        d[pos(e, gsb)] = match x.get(e) {
            Some(&v) if !bad => {
                ((v * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8) ^ zero
            }
            _ => zero,
        };
    }
    if !bad {
        amax / 127.0
    } else if amax == 0.0 && !nan {
        0.0
    } else {
        f32::NAN
    }
}

/// Quantise rows `0..sx.len()` of `x` (`m × k`) into `q` (laid out as `lay`) and `sx`.
#[inline(always)]
fn quantise_rows_plain(x: &[f32], k: usize, q: &mut [u32], lay: QLayout, sx: &mut [f32], u: bool) {
    // SAFETY: the same bytes as q (4 per u32, alignment 1); every value is a valid u8.
    let bytes = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr().cast::<u8>(), q.len() * 4) };
    let g = lay.groups(k);
    for (i, s) in sx.iter_mut().enumerate() {
        let d = &mut bytes[4 * lay.row(i)..];
        *s = quantise_row(&x[i * k..(i + 1) * k], d, 4 * lay.gs, g, u);
    }
}

/// [`quantise_rows`] in plain Rust whatever the CPU (for tests).
#[cfg(test)]
pub(super) fn quantise_rows_portable(
    x: &[f32],
    k: usize,
    q: &mut [u32],
    lay: QLayout,
    sx: &mut [f32],
    u: bool,
) {
    quantise_rows_plain(x, k, q, lay, sx, u)
}

/// # Safety
/// The CPU must have AVX2 (for `vroundps` and 256-bit vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantise_rows_avx2(
    x: &[f32],
    k: usize,
    q: &mut [u32],
    lay: QLayout,
    sx: &mut [f32],
    u: bool,
) {
    quantise_rows_plain(x, k, q, lay, sx, u)
}

/// [`quantise_row`] 16 inputs at a time with AVX-512F/BW (the same float32 operations,
/// hence the same values; LLVM does not vectorise the saturating conversions well).
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantise_row_avx512(
    x: &[f32],
    d: &mut [u8],
    gsb: usize,
    groups: usize,
    unsigned: bool,
) -> f32 {
    // Every group's 64 bytes lie in d (groups ≥ ceil(x.len() / 64)).
    assert!(groups >= x.len().div_ceil(64) && d.len() >= (groups - 1) * gsb + 64);
    let zero = if unsigned { 0x80u8 } else { 0 };
    let n16 = x.len() / 16 * 16;
    // SAFETY: loads of 16 floats at i ≤ n16 − 16 inside x, stores of 16 bytes at
    // pos(i) (i a multiple of 16 below groups · 64: within one group's 64 bytes,
    // inside d as asserted) and of 64 bytes at pos(i) for i a multiple of 64 (one
    // whole group); unaligned.
    unsafe {
        let mut mx = _mm512_setzero_ps();
        let mut nan: __mmask16 = 0;
        for i in (0..n16).step_by(16) {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        }
        let mut amax = _mm512_reduce_max_ps(mx);
        let mut bad = nan != 0;
        for &v in &x[n16..] {
            amax = amax.max(v.abs());
            bad |= v.is_nan();
        }
        if amax == 0.0 || !amax.is_finite() || bad {
            let z = _mm_set1_epi8(zero as i8);
            for i in (0..groups * 64).step_by(16) {
                _mm_storeu_si128(d.as_mut_ptr().add(pos(i, gsb)).cast(), z);
            }
            return if amax == 0.0 && !bad { 0.0 } else { f32::NAN };
        }
        let inv = 127.0 / amax;
        let (vinv, lo, hi) = (
            _mm512_set1_ps(inv),
            _mm512_set1_ps(-127.0),
            _mm512_set1_ps(127.0),
        );
        let flip = _mm_set1_epi8(zero as i8);
        // Whole groups of 64 inputs: clamp, convert rounding to nearest even (the
        // same values as rounding first: ±127 are integers), and narrow four vectors
        // with saturating packs (exact, the values are within ±127), which interleave
        // the 128-bit lanes: dword 4l + v holds vector v's lane l, put back in order
        // by one permutation. Half the shuffles of four `vpmovdb`.
        let n64 = x.len() / 64 * 64;
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let flip64 = _mm512_set1_epi8(zero as i8);
        for i in (0..n64).step_by(64) {
            let q: [__m512i; 4] = std::array::from_fn(|j| {
                let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16 * j)), vinv);
                let c = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(c)
            });
            let w = _mm512_packs_epi16(
                _mm512_packs_epi32(q[0], q[1]),
                _mm512_packs_epi32(q[2], q[3]),
            );
            let b = _mm512_xor_si512(_mm512_permutexvar_epi32(order, w), flip64);
            _mm512_storeu_si512(d.as_mut_ptr().add(pos(i, gsb)).cast(), b);
        }
        for i in (n64..n16).step_by(16) {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vinv);
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let c = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
            let q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c));
            _mm_storeu_si128(
                d.as_mut_ptr().add(pos(i, gsb)).cast(),
                _mm_xor_si128(q, flip),
            );
        }
        for e in n16..groups * 64 {
            d[pos(e, gsb)] = match x.get(e) {
                Some(&v) => ((v * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8) ^ zero,
                None => zero,
            };
        }
        amax / 127.0
    }
}

/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantise_rows_avx512(
    x: &[f32],
    k: usize,
    q: &mut [u32],
    lay: QLayout,
    sx: &mut [f32],
    u: bool,
) {
    // SAFETY: the same bytes as q (4 per u32, alignment 1); every value is a valid u8.
    let bytes = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr().cast::<u8>(), q.len() * 4) };
    let g = lay.groups(k);
    for (i, s) in sx.iter_mut().enumerate() {
        let d = &mut bytes[4 * lay.row(i)..];
        // SAFETY: the CPU has AVX-512F and BW (this function's contract).
        *s = unsafe { quantise_row_avx512(&x[i * k..(i + 1) * k], d, 4 * lay.gs, g, u) };
    }
}

/// Quantise rows `0..sx.len()` of `x` (`k` inputs each) into `q`, laid out as `lay`
/// (the first row at the start of `q`), and their scales into `sx`.
pub(super) fn quantise_rows(
    x: &[f32],
    k: usize,
    q: &mut [u32],
    lay: QLayout,
    sx: &mut [f32],
    u: bool,
) {
    assert!(x.len() >= sx.len() * k && q.len() >= lay.len(sx.len(), k));
    assert!(lay.gs >= 16 && lay.lda >= 16 && lay.ts >= 16 * lay.lda);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU has AVX-512F and BW (checked just above).
        return unsafe { quantise_rows_avx512(x, k, q, lay, sx, u) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { quantise_rows_avx2(x, k, q, lay, sx, u) };
    }
    quantise_rows_plain(x, k, q, lay, sx, u)
}

/// Floats of scratch [`int8`] quantises `m` rows of `k` inputs into, on any path: the
/// larger of the two layouts (AMX tiles round the rows up to 32), plus a scale a row
/// and room to align the rows.
pub(super) fn scratch_len(m: usize, k: usize) -> usize {
    let tiles = QLayout::tiles(k).len(m.next_multiple_of(32), k);
    tiles.max(QLayout::rows(k).len(m, k)) + m + ALIGN_SLACK
}

/// Floats [`int8`] may skip at the start of its buffer to align the quantised rows to
/// 64 bytes.
const ALIGN_SLACK: usize = 16;

/// `y = x · w + bias` (then a ReLU when `relu`) for an int8 kernel `w`
/// (`[ceil(n/32), ceil(k/4), 32, 4]`) with per-column scales `sw`, on `threads` tasks
/// split by panels (`m, k, n > 0`; the caller checked the lengths). The quantised rows
/// go to `scratch` when it holds [`scratch_len`] floats, else to a buffer of their own.
#[allow(clippy::too_many_arguments)]
pub(super) fn int8(
    path: Path,
    x: &[f32],
    w: &[i8],
    sw: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    relu: bool,
    scratch: &mut [f32],
) {
    let kern = Kernel::choose(path, m);
    let amx = kern == Kernel::Amx;
    let lay = if amx {
        QLayout::tiles(k)
    } else {
        QLayout::rows(k)
    };
    // AMX reads whole tiles: rows up to a multiple of 32.
    let rows = if amx { m.next_multiple_of(32) } else { m };
    let qlen = lay.len(rows, k);
    let mut own = Vec::new();
    let buf: &mut [f32] = if scratch.len() >= qlen + m + ALIGN_SLACK {
        scratch
    } else {
        own.resize(qlen + m + ALIGN_SLACK, 0.0);
        &mut own
    };
    // The quantised rows start 64-byte aligned: a tile load whose 64-byte rows each
    // straddle two cache lines took 7 times as long (16 ns instead of 2.3 on the
    // Sapphire Rapids-class VM, from L1), and a VNNI kernel's row loads likewise.
    let skip = buf.as_ptr().align_offset(64).min(ALIGN_SLACK);
    let (qbuf, sx) = buf[skip..skip + qlen + m].split_at_mut(qlen);
    // SAFETY: u32 and f32 have the same size and alignment and every bit pattern is
    // valid for both; `qbuf` is an exclusive borrow that `xq` replaces.
    let xq = unsafe { std::slice::from_raw_parts_mut(qbuf.as_mut_ptr().cast::<u32>(), qlen) };
    // Not zeroed: `quantise_row` writes every group of every row below m, its padding
    // past k included; rows past m (AMX's last tiles) only reach output rows past m,
    // which are never stored (a test runs on a NaN-filled scratch). Zeroing 128 KiB per
    // layer cost 3% of the MIT67 head at batch 64.
    // Large batches are quantised in parallel (a fork costs about a microsecond), in
    // whole tiles of 16 rows where the layout is AMX's.
    let unit = if amx { 16 } else { 1 };
    let units = m.div_ceil(unit);
    let qparts = if m * k >= 1 << 16 {
        threads.clamp(1, units)
    } else {
        1
    };
    let (qp, sp) = (Ptr(xq.as_mut_ptr()), Ptr(sx.as_mut_ptr()));
    par_for(qparts, &|t| {
        let a = (units * t / qparts * unit).min(m);
        let b = (units * (t + 1) / qparts * unit).min(m);
        let (qa, qb) = (lay.row(a), if b == m { qlen } else { lay.row(b) });
        // SAFETY: task t alone writes rows a..b of sx and the quads qa..qb of xq,
        // which hold exactly rows a..b (a and b are multiples of 16 in tile order;
        // the last task's part runs to the end of xq); both outlive par_for, which
        // returns after every task.
        let (q, s) = unsafe {
            (
                std::slice::from_raw_parts_mut(qp.get().add(qa), qb - qa),
                std::slice::from_raw_parts_mut(sp.get().add(a), b - a),
            )
        };
        quantise_rows(&x[a * k..b * k], k, q, lay, s, kern.unsigned());
    });
    let np = n.div_ceil(NR);
    // Enough panels per task to amortise the fork (≥ ~32 KiB of weights).
    let min_panels = (32768 / (k * NR)).max(1);
    let parts = threads.clamp(1, np.div_ceil(min_panels).max(1));
    let yp = SendPtr(y.as_mut_ptr());
    let (xq, sx) = (&xq[..], &sx[..]);
    // Fewer panels than a few per thread (a classifier's last layer: 67 columns are 3
    // panels, split 1 + 2 between two threads), and rows for a micro-kernel block
    // per thread: tasks own rows in whole blocks instead, all panels each.
    let step = kern.rows();
    if threads > 1 && np < 4 * threads && m >= step * threads {
        let blocks = m.div_ceil(step);
        par_for(threads, &|t| {
            let a = blocks * t / threads * step;
            let b = (blocks * (t + 1) / threads * step).min(m);
            // SAFETY: rows a..b of y are this task's alone, y holds m × n floats
            // (asserted by qdense_with); a is a multiple of the kernel's block.
            unsafe { rows_panels(kern, xq, lay, sx, w, sw, bias, yp, a..b, k, n, 0..np, relu) };
        });
        return;
    }
    par_for(parts, &|t| {
        let panels = np * t / parts..np * (t + 1) / parts;
        // SAFETY: this task's panels of y are its own (disjoint column ranges), and y
        // holds m × n floats (asserted by qdense_with).
        unsafe { rows_panels(kern, xq, lay, sx, w, sw, bias, yp, 0..m, k, n, panels, relu) };
    });
}

/// Rows `rows` of `y` for the panels `panels`.
///
/// # Safety
/// `yp` points at `m × n` floats (`m ≥ rows.end`) of which no other thread touches
/// these rows' columns of these panels; `rows.start` is a multiple of `kern.rows()`;
/// `xq` holds `m` (for AMX rounded up to 32) rows laid out as `lay`; `w` is the
/// packed kernel; the CPU supports `kern`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_panels(
    kern: Kernel,
    xq: &[u32],
    lay: QLayout,
    sx: &[f32],
    w: &[i8],
    sw: &[f32],
    bias: Option<&[f32]>,
    yp: SendPtr,
    rows: std::ops::Range<usize>,
    k: usize,
    n: usize,
    panels: std::ops::Range<usize>,
    relu: bool,
) {
    let kq = k.div_ceil(4);
    let step = kern.rows();
    #[cfg(target_arch = "x86_64")]
    if kern == Kernel::Amx {
        // SAFETY: AMX is enabled (Kernel::Amx is only chosen then).
        unsafe { super::amx::configure() };
    }
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx2");
    // The AVX-512 kernels' blocks are scaled with AVX-512 too.
    #[cfg(target_arch = "x86_64")]
    let wide512 = matches!(kern, Kernel::Amx | Kernel::Vnni512)
        && std::arch::is_x86_feature_detected!("avx512f");
    // Aligned: AMX stores its tiles here.
    let mut acc = super::Aligned([0i32; 32 * NR]);
    let acc = &mut acc.0;
    // The AMX blocks' sums of a k-blocked panel (RB rows: two blocks of 32).
    #[cfg(target_arch = "x86_64")]
    let mut accs = [const { super::Aligned([0i32; 32 * NR]) }; RB / 32];
    for r0 in rows.clone().step_by(RB) {
        let rb = RB.min(rows.end - r0);
        for p in panels.clone() {
            let c0 = p * NR;
            let ncols = NR.min(n - c0);
            let plen = kq * 4 * NR;
            let wp = &w[p * plen..][..plen];
            let passes = rb.div_ceil(step);
            let (sw, b) = (&sw[c0..c0 + ncols], bias.map(|b| &b[c0..c0 + ncols]));
            // y = acc · (sx · sw) + bias for the r rows from i0 of this panel.
            let store = |i0: usize, r: usize, acc: &[i32; 32 * NR]| {
                #[cfg(target_arch = "x86_64")]
                if wide512 {
                    // SAFETY: rows i0..i0+r, columns c0..c0+ncols of y (m × n) belong
                    // to this task; acc holds r ≤ 32 rows; the CPU has AVX-512F.
                    unsafe {
                        let y0 = yp.get().add(i0 * n + c0);
                        scale_rows_avx512(acc, &sx[i0..i0 + r], sw, b, y0, n, relu)
                    };
                    return;
                }
                for i in 0..r {
                    // SAFETY: row i0+i, columns c0..c0+ncols of y belong to this task.
                    let yr = unsafe {
                        std::slice::from_raw_parts_mut(yp.get().add((i0 + i) * n + c0), ncols)
                    };
                    let a = &acc[i * NR..i * NR + ncols];
                    #[cfg(target_arch = "x86_64")]
                    if wide {
                        // SAFETY: the CPU has AVX2 (checked below `wide`).
                        unsafe { scale_row_avx2(a, sx[i0 + i], sw, b, yr, relu) };
                        continue;
                    }
                    scale_row(a, sx[i0 + i], sw, b, yr, relu);
                }
            };
            #[cfg(target_arch = "x86_64")]
            if kern == Kernel::Amx && passes > 1 {
                // Several blocks of 32 rows: k-blocked, so that each block of the panel
                // comes from far once and then from L1 for the other rows; every
                // block's partial sums kept in its own (L1-resident) buffer.
                let kqb = AMX_KQB;
                let kblocks = kq.div_ceil(kqb);
                for kb in 0..kblocks {
                    let (q0, qn) = (kb * kqb, kqb.min(kq - kb * kqb));
                    for (j, a) in accs[..passes].iter_mut().enumerate() {
                        // Rows r0 + 32j.., from quad q0 (a whole group: kqb is a
                        // multiple of 16).
                        let xs = &xq[lay.row(r0 + step * j) + q0 / 16 * lay.gs..];
                        let r = step.min(rb - step * j);
                        // SAFETY: xs holds r rows (whole tiles of 16 rows: xq's rows
                        // are rounded up to 32) laid out as lay from group q0 / 16 on,
                        // zero-padded past kq; wp holds kq ≥ q0 + qn quad rows of 128
                        // bytes; a holds this block's sums of the quads before q0 when
                        // kb > 0; AMX-INT8 is enabled (Kernel::Amx).
                        unsafe {
                            super::amx::int8_block(
                                xs,
                                lay,
                                &wp[q0 * 4 * NR..(q0 + qn) * 4 * NR],
                                qn,
                                r,
                                &mut a.0,
                                kb > 0,
                            )
                        };
                    }
                }
                for (j, a) in accs[..passes].iter().enumerate() {
                    store(r0 + step * j, step.min(rb - step * j), &a.0);
                }
                continue;
            }
            // Vnni256's column sums, once per panel where a block has several rows.
            #[cfg(target_arch = "x86_64")]
            let mut cs128: Option<[i32; NR]> = None;
            for i0 in (r0..r0 + rb).step_by(step) {
                let r = step.min(r0 + rb - i0);
                let xs = &xq[lay.row(i0)..];
                // SAFETY: xs holds r rows (for AMX, whole tiles of 16 rows: xq's rows
                // are rounded up to 32 and i0 is a multiple of 32) laid out as lay,
                // of kq quads zero-padded to 16, wp kq quad rows of 128 bytes.
                unsafe { block(kern, r, xs, lay, wp, kq, acc) };
                #[cfg(target_arch = "x86_64")]
                if kern == Kernel::Vnni256 && r > 1 {
                    // SAFETY: wp holds kq rows of 128 bytes; Vnni256 is only chosen
                    // where the CPU has AVX2 and AVX-VNNI.
                    let cs = &*cs128.get_or_insert_with(|| unsafe { colsum128_vnni256(wp, kq) });
                    // Σ (qx + 128) · w − 128 · Σ w, exact modulo 2^32, hence exact.
                    for row in acc[..r * NR].chunks_exact_mut(NR) {
                        row.iter_mut()
                            .zip(cs)
                            .for_each(|(a, c)| *a = a.wrapping_sub(*c));
                    }
                }
                store(i0, r, acc);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if kern == Kernel::Amx {
        // SAFETY: releases this thread's tile state, which the blocks above configured.
        unsafe { super::amx::release() };
    }
}

/// Quads of k per AMX k-block (a multiple of 16, the quads of a tile row): 512
/// inputs, so a block of the panel is 16 KiB and each block of 32 rows' inputs as
/// much, together within L1 (48 KiB). 64×2048×2048 on one thread, fastest of 6 runs:
/// 0.304 ms unblocked, 0.288 (64 quads), 0.278 (128), 0.302 (2048: one block).
const AMX_KQB: usize = 128;

/// `y = acc · (sx · sw) + bias` for one row of a panel, then a ReLU when `relu` (as
/// `Act::Relu`: NaN → 0).
#[inline(always)]
fn scale_row(acc: &[i32], sx: f32, sw: &[f32], bias: Option<&[f32]>, y: &mut [f32], relu: bool) {
    #[inline(always)]
    fn go<const RELU: bool>(acc: &[i32], sx: f32, sw: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
        let act = |v: f32| if !RELU || v > 0.0 { v } else { 0.0 };
        let it = y.iter_mut().zip(acc).zip(sw);
        match b {
            Some(b) => it
                .zip(b)
                .for_each(|(((y, &a), &s), &b)| *y = act(a as f32 * (sx * s) + b)),
            None => it.for_each(|((y, &a), &s)| *y = act(a as f32 * (sx * s))),
        }
    }
    if relu {
        go::<true>(acc, sx, sw, bias, y)
    } else {
        go::<false>(acc, sx, sw, bias, y)
    }
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scale_row_avx2(
    acc: &[i32],
    sx: f32,
    sw: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    relu: bool,
) {
    scale_row(acc, sx, sw, bias, y, relu)
}

/// [`scale_row`] for the rows of a block with AVX-512F: `y[i] = acc[i] · (sx[i] · sw)
/// + bias` for `acc`'s rows (stride `NR`, `sx.len()` of them) into `y` (row stride
/// `ldy`), the panel's `sw.len()` ≤ 32 columns, then a ReLU when `relu`; the same
/// float32 operations as [`scale_row`], hence the same values (`vmaxps` with 0 as its
/// second operand gives 0 for NaN and for −0, as `v > 0 ? v : 0` does).
///
/// # Safety
/// `acc` holds `sx.len()` rows of `NR` values; `y` points at `sx.len()` rows of
/// `ldy` floats, valid for writes of the first `sw.len()` of each; the CPU has
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_rows_avx512(
    acc: &[i32],
    sx: &[f32],
    sw: &[f32],
    bias: Option<&[f32]>,
    y: *mut f32,
    ldy: usize,
    relu: bool,
) {
    let nc = sw.len();
    assert!(nc <= NR && acc.len() >= sx.len() * NR && bias.is_none_or(|b| b.len() >= nc));
    // Lanes of columns 0..16 and 16..32 that lie in the panel.
    let lanes = |c: usize| if c >= 16 { 0xFFFF } else { (1u16 << c) - 1 };
    let (m0, m1) = (lanes(nc), lanes(nc.saturating_sub(16)));
    // SAFETY: masked loads read only columns < nc of sw and bias (asserted lengths);
    // acc's rows are NR values (asserted); masked stores write columns < nc of each
    // of y's sx.len() rows (the caller's contract).
    unsafe {
        let s = [
            _mm512_maskz_loadu_ps(m0, sw.as_ptr()),
            _mm512_maskz_loadu_ps(m1, sw.as_ptr().add(16)),
        ];
        let b = bias.map(|b| {
            [
                _mm512_maskz_loadu_ps(m0, b.as_ptr()),
                _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16)),
            ]
        });
        let zero = _mm512_setzero_ps();
        for (i, &sxi) in sx.iter().enumerate() {
            let vs = _mm512_set1_ps(sxi);
            for (h, mask) in [m0, m1].into_iter().enumerate() {
                let a = _mm512_cvtepi32_ps(_mm512_loadu_si512(
                    acc.as_ptr().add(i * NR + 16 * h).cast(),
                ));
                let mut v = _mm512_mul_ps(a, _mm512_mul_ps(vs, s[h]));
                if let Some(b) = &b {
                    v = _mm512_add_ps(v, b[h]);
                }
                if relu {
                    v = _mm512_max_ps(v, zero);
                }
                _mm512_mask_storeu_ps(y.add(i * ldy + 16 * h), mask, v);
            }
        }
    }
}

/// One micro-kernel call: the exact int32 sums of `r` rows × the panel's 32 columns
/// into `acc` (row stride `NR`).
///
/// # Safety
/// `r` ≤ `kern.rows()`; `xs` holds `r` rows (32 for AMX) laid out as `lay` (rows one
/// after another except for AMX) with the quads past `kq` zero (of the value 0:
/// 0x80 bytes for the VNNI kernels); `w` holds `kq · 128` bytes; the CPU supports
/// `kern`.
unsafe fn block(
    kern: Kernel,
    r: usize,
    xs: &[u32],
    lay: QLayout,
    w: &[i8],
    kq: usize,
    acc: &mut [i32; 32 * NR],
) {
    let ldq = lay.lda;
    assert!(r >= 1 && r <= kern.rows() && w.len() >= kq * 4 * NR);
    // (AMX checks its reads of xs itself.)
    assert!(kern == Kernel::Amx || (ldq >= kq && lay.gs == 16 && xs.len() >= (r - 1) * ldq + kq));
    macro_rules! rows {
        ($f:ident, $($n:literal)*) => {
            match r {
                $($n => $f::<$n>(xs.as_ptr(), ldq, w.as_ptr(), kq, acc.as_mut_ptr()),)*
                _ => unreachable!(),
            }
        };
    }
    // SAFETY: the caller's contract, and the lengths just asserted.
    unsafe {
        match kern {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => super::amx::int8_block(xs, lay, w, kq, r, acc, false),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => rows!(vnni512, 1 2 3 4 5 6 7 8 9 10 11 12),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni256 => rows!(vnni256, 1 2 3),
            #[cfg(target_arch = "x86_64")]
            Kernel::Madd256 => rows!(madd256, 1 2),
            _ => rows!(portable, 1 2 3 4),
        }
    }
}

/// # Safety
/// `xs`: `R` rows of `ldq ≥ kq` quads; `w`: `kq · 128` bytes; `acc`: `R × NR` i32.
#[inline(always)]
unsafe fn portable<const R: usize>(
    xs: *const u32,
    ldq: usize,
    w: *const i8,
    kq: usize,
    acc: *mut i32,
) {
    // SAFETY: the caller's contract.
    let (w, out) = unsafe {
        (
            std::slice::from_raw_parts(w, kq * 4 * NR),
            std::slice::from_raw_parts_mut(acc, R * NR),
        )
    };
    let mut a = [[0i32; NR]; R];
    for (r, wr) in w.chunks_exact(4 * NR).enumerate() {
        for (i, ai) in a.iter_mut().enumerate() {
            // SAFETY: quad r of row i (r < kq ≤ ldq).
            let xb = unsafe { *xs.add(i * ldq + r) }
                .to_le_bytes()
                .map(|b| b as i8 as i32);
            for (j, s) in ai.iter_mut().enumerate() {
                let wj = &wr[4 * j..4 * j + 4];
                *s += xb[0] * wj[0] as i32
                    + xb[1] * wj[1] as i32
                    + xb[2] * wj[2] as i32
                    + xb[3] * wj[3] as i32;
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        out[i * NR..(i + 1) * NR].copy_from_slice(ai);
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// AVX-512 VNNI: per quad row two 64-byte weight loads (16 columns × 4 inputs each),
/// two `vpdpbusd` for the column sums and two per row with its broadcast quad.
///
/// # Safety
/// As [`portable`] (`xs` holds `qx + 128`); the CPU must have AVX-512F and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn vnni512<const R: usize>(
    xs: *const u32,
    ldq: usize,
    w: *const i8,
    kq: usize,
    acc: *mut i32,
) {
    // SAFETY: reads stay inside xs (R rows of ldq ≥ kq quads) and w (kq · 128 bytes),
    // writes inside acc (R × NR).
    unsafe {
        let ones = _mm512_set1_epi8(1);
        let mut a = [[_mm512_setzero_si512(); 2]; R];
        let mut cs = [_mm512_setzero_si512(); 2];
        for r in 0..kq {
            let wr = w.add(r * 4 * NR);
            if R == 1 {
                // One row: a single weight stream per core (`prefetch_row`).
                super::prefetch_row(wr.cast());
            }
            let w0 = _mm512_loadu_si512(wr.cast());
            let w1 = _mm512_loadu_si512(wr.add(2 * NR).cast());
            cs[0] = _mm512_dpbusd_epi32(cs[0], ones, w0);
            cs[1] = _mm512_dpbusd_epi32(cs[1], ones, w1);
            for (i, ai) in a.iter_mut().enumerate() {
                let xv = _mm512_set1_epi32(*xs.add(i * ldq + r) as i32);
                ai[0] = _mm512_dpbusd_epi32(ai[0], xv, w0);
                ai[1] = _mm512_dpbusd_epi32(ai[1], xv, w1);
            }
        }
        // Σ (qx + 128) · w − 128 · Σ w (exact modulo 2^32, hence exact).
        let (c0, c1) = (_mm512_slli_epi32::<7>(cs[0]), _mm512_slli_epi32::<7>(cs[1]));
        for (i, ai) in a.iter().enumerate() {
            let o = acc.add(i * NR);
            _mm512_storeu_si512(o.cast(), _mm512_sub_epi32(ai[0], c0));
            _mm512_storeu_si512(o.add(16).cast(), _mm512_sub_epi32(ai[1], c1));
        }
    }
}

/// AVX2 without VNNI: per quad row four 32-byte weight loads (8 columns × 4 inputs
/// each). For each row the signed quad is broadcast; `vpsignb` moves its signs onto
/// the weights and `vpmaddubsw` multiplies them with its absolute values (unsigned)
/// and adds pairs into int16, `vpmaddwd` with ones adds those pairs into int32. A
/// pair is at most 2 · 127 · 127 = 32258 in magnitude, so int16 never saturates:
/// that needs weights in −127 … 127, which the program loader checks (−128 would
/// negate to itself).
///
/// # Safety
/// As [`portable`] (`xs` holds `qx` signed, in −127 … 127), the weights are in −127 …
/// 127, and the CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn madd256<const R: usize>(
    xs: *const u32,
    ldq: usize,
    w: *const i8,
    kq: usize,
    acc: *mut i32,
) {
    // SAFETY: reads stay inside xs (R rows of ldq ≥ kq quads) and w (kq · 128 bytes),
    // writes inside acc (R × NR).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut a = [[_mm256_setzero_si256(); 4]; R];
        for r in 0..kq {
            let wr = w.add(r * 4 * NR);
            if R == 1 {
                // One row: a single weight stream per core (`prefetch_row`).
                super::prefetch_row(wr.cast());
            }
            let xv: [__m256i; R] =
                std::array::from_fn(|i| _mm256_set1_epi32(*xs.add(i * ldq + r) as i32));
            let ax: [__m256i; R] = std::array::from_fn(|i| _mm256_abs_epi8(xv[i]));
            for h in 0..4 {
                let wv = _mm256_loadu_si256(wr.add(32 * h).cast());
                for ((ai, x), u) in a.iter_mut().zip(&xv).zip(&ax) {
                    let p = _mm256_maddubs_epi16(*u, _mm256_sign_epi8(wv, *x));
                    ai[h] = _mm256_add_epi32(ai[h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (h, v) in ai.iter().enumerate() {
                _mm256_storeu_si256(acc.add(i * NR + 8 * h).cast(), *v);
            }
        }
    }
}

/// `128 · Σ_k w[k, col]` for the panel's 32 columns with AVX-VNNI (`vpdpbusd` of
/// bytes of 1 and the weights): what [`vnni256`]'s sums exceed the true ones by.
///
/// # Safety
/// `w` holds `kq · 128` bytes; the CPU must have AVX2 and AVX-VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn colsum128_vnni256(w: &[i8], kq: usize) -> [i32; NR] {
    assert!(w.len() >= kq * 4 * NR);
    let mut out = [0i32; NR];
    // SAFETY: loads inside w (kq rows of 128 bytes, asserted), stores inside out.
    unsafe {
        let ones = _mm256_set1_epi8(1);
        let mut cs = [_mm256_setzero_si256(); 4];
        for r in 0..kq {
            for (h, c) in cs.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(w.as_ptr().add(r * 4 * NR + 32 * h).cast());
                *c = _mm256_dpbusd_avx_epi32(*c, ones, wv);
            }
        }
        for (h, c) in cs.iter().enumerate() {
            _mm256_storeu_si256(
                out.as_mut_ptr().add(8 * h).cast(),
                _mm256_slli_epi32::<7>(*c),
            );
        }
    }
    out
}

/// AVX-VNNI (256-bit `vpdpbusd`, CPUs without AVX-512): per quad row four 32-byte
/// weight loads (8 columns × 4 inputs each), each used by every row's broadcast quad.
/// Sixteen registers allow 3 rows × 4 accumulators: for several rows the column sums
/// are not summed alongside (as [`vnni512`] does) but once per panel
/// ([`colsum128_vnni256`]) and the caller subtracts them; one row (batch 1: a single
/// pass over the weights) sums and subtracts them here.
///
/// # Safety
/// As [`portable`] (`xs` holds `qx + 128`); the CPU must have AVX2 and AVX-VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn vnni256<const R: usize>(
    xs: *const u32,
    ldq: usize,
    w: *const i8,
    kq: usize,
    acc: *mut i32,
) {
    // SAFETY: reads stay inside xs (R rows of ldq ≥ kq quads) and w (kq · 128 bytes),
    // writes inside acc (R × NR).
    unsafe {
        let ones = _mm256_set1_epi8(1);
        let mut a = [[_mm256_setzero_si256(); 4]; R];
        let mut cs = [_mm256_setzero_si256(); 4];
        for r in 0..kq {
            let wr = w.add(r * 4 * NR);
            if R == 1 {
                // One row: a single weight stream per core (`prefetch_row`).
                super::prefetch_row(wr.cast());
            }
            let xv: [__m256i; R] =
                std::array::from_fn(|i| _mm256_set1_epi32(*xs.add(i * ldq + r) as i32));
            for h in 0..4 {
                let wv = _mm256_loadu_si256(wr.add(32 * h).cast());
                if R == 1 {
                    cs[h] = _mm256_dpbusd_avx_epi32(cs[h], ones, wv);
                }
                for (ai, x) in a.iter_mut().zip(&xv) {
                    ai[h] = _mm256_dpbusd_avx_epi32(ai[h], *x, wv);
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (h, v) in ai.iter().enumerate() {
                let v = if R == 1 {
                    _mm256_sub_epi32(*v, _mm256_slli_epi32::<7>(cs[h]))
                } else {
                    *v
                };
                _mm256_storeu_si256(acc.add(i * NR + 8 * h).cast(), v);
            }
        }
    }
}
