//! Dense products with quantised kernels: `y[m, n] = x[m, k] · w[k, n] (+ bias[n])`
//! with `w` stored as bf16 (`panels32x2`) or int8 with per-column scales
//! (`panels32x4`), see docs/enclave-program.md.
//!
//! Both layouts are 32-column panels whose rows come in groups of G = 2 (bf16) or
//! G = 4 (int8) consecutive input rows, interleaved: one 64-byte load holds 16
//! columns × G rows, the operand shape of AVX512_BF16's `vdpbf16ps` (and of VNNI's
//! `vpdpbusd`). The weights are streamed at that size (half or a quarter of the
//! float32 bytes) on every path:
//!
//! * bf16 — `x` is rounded to bf16 too (nearest, ties to even) and the products are
//!   summed in float32. With AVX512_BF16, `vdpbf16ps` does two products per lane per
//!   instruction; with AVX-512F only, each 64-byte load is widened to two float32
//!   vectors by a shift and a mask (exact) and multiplied with FMA; the portable
//!   path does the same in plain Rust (compiled a second time with AVX2+FMA enabled,
//!   which LLVM vectorises, for one row); AVX2 blocks of more rows widen in registers
//!   as AVX-512F does, in 5 × 16 tiles (`bf16_half_avx2`).
//! * int8 — dynamic activation quantisation: each row of `x` is quantised to int8
//!   with its own scale and the products are summed exactly in int32, with AMX-INT8
//!   or VNNI where the CPU has them (module `int8`).
//!
//! Work is split across threads by panels; rows come in chunks of `RB`, (bf16) staged
//! converted in a stack buffer `KC` inputs at a time, and computed in blocks of up to
//! `MR` rows per micro-kernel call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::conv::ConvParams;
use super::dense::NR;
use super::{conv, par_for, par_row_ranges, Act, SendPtr};

mod int8;

/// Rows per AVX-512 micro-kernel call (12 × 2 accumulators + weights fit 32 zmm).
const MR: usize = 12;
/// Rows per portable micro-kernel call.
const MR_PORTABLE: usize = 4;
/// Rows per AVX2 bf16 micro-kernel call: 5 × 2 accumulators, the four widened weight
/// vectors and two broadcasts fill the 16 registers. Each accumulator takes two FMAs
/// per pair row one after the other, so fewer rows wait on FMA latency: a 2048×2048
/// layer at batch 64, 1 thread, AMD EPYC VM (Zen 3): 4 rows 11.9 ms, 5 rows 7.2–7.3
/// ms (float32 7.6–7.8 ms in the same runs); 6 rows, whose broadcasts were re-done per
/// half-panel vector, 18.2 ms.
const MR_AVX2: usize = 5;
/// Rows of `x` staged at once (a multiple of 32 and of `MR_PORTABLE`): the weights
/// are streamed once per chunk.
const RB: usize = 64;
/// Inputs staged at once, bf16 (a multiple of 32): RB × KC u32 = 64 KiB of stack.
const KC_BF16: usize = 256;
/// Fewest rows of a chunk that the AMX path computes with tiles (16 rows each).
const AMX_MIN_ROWS: usize = 8;

/// How far ahead (bytes) the one-row kernels prefetch the weights they stream.
const PF_AHEAD: usize = 1024;

/// Request the two cache lines `PF_AHEAD` bytes after the 128-byte weight row at `w`
/// into L1. In the one-row bf16 dot kernel it paid: the MIT67 head at batch 1 took
/// 0.33 ms (fastest call of 2000; median 0.40–0.43) without it and 0.275 ms (median
/// 0.34–0.42) with it, same sitting. A plain sum over a buffer gains 0–6% from it
/// (`cargo run --release --example stream_bandwidth`), where the number of
/// independent accumulator chains matters more (see `ops::dense`). A prefetch is a
/// hint: it never faults, so the address may lie past the weights.
#[inline(always)]
fn prefetch_row(w: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching reads nothing and cannot fault; SSE is part of x86_64.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PF_AHEAD).cast());
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PF_AHEAD + 64).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
}

/// A value at a 64-byte boundary: the buffers tiles are loaded from or stored to
/// (a tile row that straddles two cache lines costs several times an aligned one).
#[repr(C, align(64))]
struct Aligned<T>(T);

/// A quantised dense kernel, `k × n`, packed (module doc).
#[derive(Clone, Copy)]
pub enum QKernel<'a> {
    /// `[ceil(n/32), ceil(k/2), 32, 2]` bf16 bit patterns.
    Bf16(&'a [u16]),
    /// `[ceil(n/32), ceil(k/4), 32, 4]` int8 values and `scale[n]`.
    Int8 { q: &'a [i8], scale: &'a [f32] },
}

/// The kernel code that runs, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    Portable,
    /// The portable code compiled with AVX2+FMA; int8 with AVX-VNNI where the CPU
    /// has it.
    Avx2,
    /// AVX-512F: bf16 widened to float32 in registers; int8 with AVX-512 VNNI
    /// where the CPU has it (else as `Avx2`).
    Avx512,
    /// AVX512_BF16 `vdpbf16ps` for bf16 (int8 runs the `Avx512` kernel).
    Avx512Bf16,
    /// AMX-BF16 tiles (`tdpbf16ps`) for bf16 blocks of at least `AMX_MIN_ROWS` rows,
    /// the `Avx512Bf16` kernel for smaller ones; AMX-INT8 (`tdpbssd`) likewise for
    /// int8 (AVX-512 VNNI for smaller blocks).
    Amx,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
            Path::Avx512Bf16 => "avx512bf16",
            Path::Amx => "amx",
        }
    }
}

/// Every path this CPU can run, best first.
pub fn available() -> Vec<Path> {
    let mut v = vec![Path::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            v.push(Path::Avx2);
        }
        if has!("avx512f") {
            v.push(Path::Avx512);
            if has!("avx512bf16") {
                v.push(Path::Avx512Bf16);
            }
            if AMX_OK.load(Ordering::Relaxed) {
                v.push(Path::Amx);
            }
        }
    }
    v.reverse();
    v
}

/// Set once the kernel let this process use AMX tile data ([`enable_amx`]).
static AMX_OK: AtomicBool = AtomicBool::new(false);
/// Set with `AMX_OK` where the CPU also has AMX-INT8.
static AMX_INT8: AtomicBool = AtomicBool::new(false);

/// Ask Linux for permission to use AMX (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`; without it the first tile instruction faults). The worker
/// calls this before its seccomp filter is installed, which does not allow
/// `arch_prctl`; where the CPU has no AMX-BF16 or the kernel (or Gramine) refuses,
/// the AMX path is simply not available.
pub fn enable_amx() {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 0 gives the highest leaf.
        let (max, l7) = unsafe { (__cpuid(0).eax, __cpuid_count(7, 0)) };
        if max < 7 || l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
            return;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with two integer arguments; it only changes which
        // extended CPU state this process may use, no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if r == 0 {
            AMX_OK.store(true, Ordering::Relaxed);
            // CPUID leaf 7 EDX bit 25: AMX-INT8.
            AMX_INT8.store(l7.edx & (1 << 25) != 0, Ordering::Relaxed);
        }
    }
}

/// The path used: the best available, capped by `ENNCLAVE_NO_AVX512=1` or
/// `ENNCLAVE_KERNEL=avx2` (at most `avx2`), `ENNCLAVE_KERNEL=portable`, and by
/// `ENNCLAVE_QKERNEL=amx|avx512bf16|avx512|avx2|portable` (at most that
/// one; tests use it to run every path in the worker). On a CPU with AMX the bf16
/// blocks of few rows run the widened `avx512` kernel, not `vdpbf16ps`: on the Xeon
/// (Sapphire Rapids class) it was measured on, `vdpbf16ps` ran at half the rate of
/// the FMA the widened kernel uses.
pub fn path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        let mut cap = match std::env::var("ENNCLAVE_QKERNEL").as_deref() {
            Ok("portable") => Path::Portable,
            Ok("avx2") => Path::Avx2,
            Ok("avx512") => Path::Avx512,
            Ok("avx512bf16") => Path::Avx512Bf16,
            _ => Path::Amx,
        };
        if std::env::var_os("ENNCLAVE_NO_AVX512").is_some_and(|v| v == "1") {
            cap = cap.min(Path::Avx2);
        }
        // The fp32 family switch caps these kernels the same way.
        match std::env::var("ENNCLAVE_KERNEL").as_deref() {
            Ok("avx2") => cap = cap.min(Path::Avx2),
            Ok("portable") => cap = Path::Portable,
            _ => {}
        }
        available()
            .into_iter()
            .find(|&p| p <= cap)
            .unwrap_or(Path::Portable)
    })
}

/// The weight buffer's floats viewed as bf16 bit patterns.
pub fn as_u16(w: &[f32]) -> &[u16] {
    // SAFETY: the same bytes (len · 4 = 2 · len · 2) at an alignment of 4 ≥ 2; every
    // bit pattern is a valid u16; the lifetime is w's.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u16>(), w.len() * 2) }
}

/// The weight buffer's floats viewed as int8 values.
pub fn as_i8(w: &[f32]) -> &[i8] {
    // SAFETY: the same bytes at an alignment of 4 ≥ 1; every bit pattern is a valid
    // i8; the lifetime is w's.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<i8>(), w.len() * 4) }
}

/// float32 → bf16, round to nearest, ties to even; NaN stays a quiet NaN.
#[inline]
pub fn bf16_bits(f: f32) -> u16 {
    let u = f.to_bits();
    if f.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// The leading pairs of `xr` rounded to bf16 into `d` (as `bf16_rows` packs them) 32
/// inputs at a time with AVX512_BF16's `vcvtne2ps2bf16` where the CPU has it (the
/// same rounding, except that it reads subnormal inputs as zero); returns how many
/// pairs it wrote (0 elsewhere), the caller does the rest.
fn pack_pairs_fast(xr: &[f32], d: &mut [u32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the CPU has AVX-512F and AVX512_BF16 (checked just above).
        return unsafe { pack_pairs_avx512bf16(xr, d) };
    }
    let _ = (xr, d);
    0
}

/// # Safety
/// The CPU must have AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_pairs_avx512bf16(xr: &[f32], d: &mut [u32]) -> usize {
    let blocks = (xr.len() / 32).min(d.len() / 16);
    for i in 0..blocks {
        // SAFETY: inputs 32i..32i+32 lie in xr and pairs 16i..16i+16 in d (blocks ≤
        // both lengths / block size); unaligned loads and stores.
        unsafe {
            let lo = _mm512_loadu_ps(xr.as_ptr().add(32 * i));
            let hi = _mm512_loadu_ps(xr.as_ptr().add(32 * i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(d.as_mut_ptr().add(16 * i).cast(), v);
        }
    }
    16 * blocks
}

/// `y = x · w + bias` on the path [`path`] chose.
#[allow(clippy::too_many_arguments)]
pub fn qdense(
    x: &[f32],
    w: QKernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    qdense_with(path(), x, w, bias, y, m, k, n, threads)
}

/// Floats of scratch [`qdense_act`] uses for `m` rows of `k` inputs with int8 weights
/// (the quantised rows and their scales; bf16 needs none).
pub fn scratch_len(m: usize, k: usize) -> usize {
    int8::scratch_len(m, k)
}

/// [`qdense`] with a ReLU when `relu` (as `Act::Relu`: NaN → 0), which the int8
/// kernels apply as they store and the bf16 ones to each task's block of `y` as it is
/// done (no single-threaded pass over `y`). int8 quantises the rows of `x` into
/// `scratch` (the executor's secret memory) when it holds [`scratch_len`] floats, else
/// into a buffer of its own.
#[allow(clippy::too_many_arguments)]
pub fn qdense_act(
    x: &[f32],
    w: QKernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    relu: bool,
    scratch: &mut [f32],
) {
    qdense_act_with(path(), x, w, bias, y, m, k, n, threads, relu, scratch)
}

/// [`qdense`] on a given path (which the CPU must support; `available()`).
#[allow(clippy::too_many_arguments)]
pub fn qdense_with(
    path: Path,
    x: &[f32],
    w: QKernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    qdense_act_with(path, x, w, bias, y, m, k, n, threads, false, &mut [])
}

/// [`qdense_act`] on a given path (which the CPU must support; `available()`).
#[allow(clippy::too_many_arguments)]
pub fn qdense_act_with(
    path: Path,
    x: &[f32],
    w: QKernel<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    relu: bool,
    scratch: &mut [f32],
) {
    assert!(available().contains(&path));
    let np = n.div_ceil(NR);
    let w_ok = match w {
        QKernel::Bf16(w) => w.len() >= np * k.div_ceil(2) * 2 * NR,
        QKernel::Int8 { q, scale } => q.len() >= np * k.div_ceil(4) * 4 * NR && scale.len() >= n,
    };
    assert!(x.len() >= m * k && y.len() >= m * n && w_ok);
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
            if relu {
                Act::Relu.apply(row);
            }
        }
        return;
    }
    let wb = match w {
        QKernel::Int8 { q, scale } => {
            return int8::int8(path, x, q, scale, bias, y, m, k, n, threads, relu, scratch)
        }
        QKernel::Bf16(wb) => wb,
    };
    // Enough panels per task to amortise the fork (≥ ~32 KiB of weights).
    let min_panels = (32768 / (k * NR)).max(1);
    let parts = threads.clamp(1, np.div_ceil(min_panels).max(1));
    let yp = SendPtr(y.as_mut_ptr());
    par_for(parts, &|t| {
        let panels = np * t / parts..np * (t + 1) / parts;
        let (c0, c1) = (panels.start * NR, (panels.end * NR).min(n));
        for r0 in (0..m).step_by(RB) {
            let rb = RB.min(m - r0);
            bf16_rows(path, x, wb, bias, yp, r0, rb, k, n, &panels);
            if relu && c1 > c0 {
                for i in r0..r0 + rb {
                    // SAFETY: columns c0..c1 of row i are this task's (its panels), inside
                    // y (m × n, asserted above); bf16_rows has finished with them.
                    let yr = unsafe {
                        std::slice::from_raw_parts_mut(yp.get().add(i * n + c0), c1 - c0)
                    };
                    Act::Relu.apply(yr);
                }
            }
        }
    });
}

/// Rows `r0..r0+rb` of `y` for the panels `panels`, bf16 kernel.
#[allow(clippy::too_many_arguments)]
fn bf16_rows(
    path: Path,
    x: &[f32],
    w: &[u16],
    bias: Option<&[f32]>,
    yp: SendPtr,
    r0: usize,
    rb: usize,
    k: usize,
    n: usize,
    panels: &std::ops::Range<usize>,
) {
    // The dot-product path reads x as bf16 pairs (one u32 per two inputs, the lower
    // input in the low half), the others as the rounded values' float32 bits (one u32
    // per input): broadcasts straight from memory, no unpacking per row.
    let amx = path == Path::Amx && rb >= AMX_MIN_ROWS;
    let path = if path == Path::Amx && !amx {
        // Blocks too small for tiles: every CPU with AMX-BF16 has AVX512_BF16 too,
        // whose dot product is faster than widening (batch 1: 0.31 against 0.41 ms
        // for one 2048×2048 layer, one thread, Intel Xeon VM).
        #[cfg(target_arch = "x86_64")]
        let dot = std::arch::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let dot = false;
        if dot {
            Path::Avx512Bf16
        } else {
            Path::Avx512
        }
    } else {
        path
    };
    // Inputs staged per pass, and the staged rows' stride (u32). One row (batch 1)
    // stages all of k, so each panel is read whole in one call instead of in KC_BF16
    // pieces with every panel visited in turn for each piece (the MIT67 head, 2
    // threads, in-process: 0.30 → 0.22 ms); more rows stage KC_BF16 at a time, each
    // panel block then reused from cache by all of them.
    let ldx = match k.next_multiple_of(32) {
        kk if rb == 1 && kk <= RB * KC_BF16 => kk,
        _ => KC_BF16,
    };
    let pairs = amx || path == Path::Avx512Bf16;
    #[cfg(target_arch = "x86_64")]
    if amx {
        // SAFETY: AMX is enabled (Path::Amx is only available then).
        unsafe { amx::configure() };
    }
    let kpairs = k.div_ceil(2);
    let mut xb = [0u32; RB * KC_BF16];
    let mut k0 = 0;
    while k0 < k {
        let kc = ldx.min(k - k0);
        let kp = kc.div_ceil(2);
        for i in 0..rb {
            let xr = &x[(r0 + i) * k + k0..(r0 + i) * k + k0 + kc];
            let row = &mut xb[i * ldx..(i + 1) * ldx];
            if pairs {
                let done = pack_pairs_fast(xr, &mut row[..kp]);
                for (r, d) in row[..kp].iter_mut().enumerate().skip(done) {
                    let a = bf16_bits(xr[2 * r]) as u32;
                    let b = xr.get(2 * r + 1).map_or(0, |&v| bf16_bits(v) as u32);
                    *d = a | (b << 16);
                }
                // Tiles read whole groups of 16 pairs (rows past rb stay 0 from the start).
                row[kp..kp.next_multiple_of(16)].fill(0);
            } else {
                for (d, &v) in row[..kc].iter_mut().zip(xr) {
                    *d = (bf16_bits(v) as u32) << 16;
                }
                row[kc..2 * kp].fill(0);
            }
        }
        for p in panels.clone() {
            let c0 = p * NR;
            let ncols = NR.min(n - c0);
            let wb = &w[(p * kpairs + k0 / 2) * 2 * NR..][..kp * 2 * NR];
            let b = bias.filter(|_| k0 == 0).map(|b| &b[c0..c0 + ncols]);
            let step = if amx {
                32
            } else if path >= Path::Avx512 {
                MR
            } else if path == Path::Avx2 {
                MR_AVX2
            } else {
                MR_PORTABLE
            };
            for i0 in (0..rb).step_by(step) {
                let r = step.min(rb - i0);
                let blk = Block {
                    first: k0 == 0,
                    bias: b,
                    // SAFETY (pointer arithmetic only): row r0+i0, column c0 of y.
                    y: unsafe { yp.get().add((r0 + i0) * n + c0) },
                    ldy: n,
                    ncols,
                };
                let xs = &xb[i0 * ldx..];
                // SAFETY: the block's rows and columns of y belong to this task alone
                // (its panels) and lie inside y (asserted by qdense_with); xs holds r
                // rows of ldx ≥ 2·kp values; wb holds kp pair rows of 64 values; the
                // path's CPU features were checked by qdense_with.
                #[cfg(target_arch = "x86_64")]
                if amx {
                    // SAFETY: as above; xs also holds 32 rows (RB ≥ 32 + i0 whenever
                    // rows i0+16.. are read, else only 16) of ldx (KC_BF16 with AMX) ≥
                    // kp rounded up to 16 pairs (zeroed past kp and past rb), and AMX
                    // was enabled.
                    unsafe { amx::bf16_block(xs, ldx, wb, kp, r, &blk) };
                    continue;
                }
                unsafe { bf16_block(path, r, xs, ldx, wb, kp, &blk) };
            }
        }
        k0 += kc;
    }
    #[cfg(target_arch = "x86_64")]
    if amx {
        // SAFETY: releases this thread's tile state, which the blocks above configured.
        unsafe { amx::release() };
    }
}

/// Where a bf16 micro-kernel's `r × ncols` result goes: `y = base + acc`, with
/// `base` the bias (or 0) on the first k-block and `y` itself after that.
#[derive(Clone, Copy)]
struct Block<'a> {
    first: bool,
    bias: Option<&'a [f32]>,
    y: *mut f32,
    ldy: usize,
    ncols: usize,
}

impl Block<'_> {
    /// Store one row of portable accumulators.
    ///
    /// # Safety
    /// `y` row `i` must be valid for `ncols` writes.
    #[inline(always)]
    unsafe fn store_row(&self, i: usize, acc: &[f32; NR]) {
        // SAFETY: the caller's contract.
        let yr = unsafe { std::slice::from_raw_parts_mut(self.y.add(i * self.ldy), self.ncols) };
        for (j, d) in yr.iter_mut().enumerate() {
            let base = if self.first {
                self.bias.map_or(0.0, |b| b[j])
            } else {
                *d
            };
            *d = base + acc[j];
        }
    }
}

macro_rules! by_rows {
    ($r:expr, $f:ident, $($a:expr),*) => {
        match $r {
            1 => $f::<1>($($a),*),
            2 => $f::<2>($($a),*),
            3 => $f::<3>($($a),*),
            4 => $f::<4>($($a),*),
            5 => $f::<5>($($a),*),
            6 => $f::<6>($($a),*),
            7 => $f::<7>($($a),*),
            8 => $f::<8>($($a),*),
            9 => $f::<9>($($a),*),
            10 => $f::<10>($($a),*),
            11 => $f::<11>($($a),*),
            _ => $f::<12>($($a),*),
        }
    };
}

/// One bf16 micro-kernel call: `r` rows (≤ `MR`; ≤ `MR_AVX2` on AVX2, ≤
/// `MR_PORTABLE` on the portable path), `kp` pair rows.
///
/// # Safety
/// `blk.y` must be valid for `r` rows of `blk.ncols` writes (row stride `blk.ldy`),
/// `xs` must hold `r` rows of `ldx ≥ 2·kp` values (bf16_rows), `w` at least `kp · 64`
/// values, and the CPU must support `path`.
unsafe fn bf16_block(
    path: Path,
    r: usize,
    xs: &[u32],
    ldx: usize,
    w: &[u16],
    kp: usize,
    blk: &Block,
) {
    assert!(xs.len() >= (r - 1) * ldx + 2 * kp && w.len() >= kp * 2 * NR);
    // SAFETY: the caller's contract, and the lengths just asserted.
    unsafe {
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 if r == 1 => bf16_dot_row(xs.as_ptr(), w.as_ptr(), kp, blk),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => by_rows!(r, bf16_dot, xs.as_ptr(), ldx, w.as_ptr(), kp, blk),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 if r == 1 => bf16_wide_row(xs.as_ptr(), w.as_ptr(), kp, blk),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => by_rows!(r, bf16_wide, xs.as_ptr(), ldx, w.as_ptr(), kp, blk),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 if r == 1 => bf16_wide_row_avx2(xs.as_ptr(), w.as_ptr(), kp, blk),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => bf16_wide_avx2(r, xs, ldx, w, kp, blk),
            _ => bf16_portable(r, xs, ldx, w, kp, blk),
        }
    }
}

// ---- portable and AVX2 kernels ------------------------------------------------------

#[inline(always)]
fn bf16_portable_rows<const R: usize>(
    xs: &[u32],
    ldx: usize,
    w: &[u16],
    kp: usize,
) -> [[f32; NR]; R] {
    let mut acc = [[0f32; NR]; R];
    for (r, wr) in w[..kp * 2 * NR].chunks_exact(2 * NR).enumerate() {
        let mut lo = [0f32; NR];
        let mut hi = [0f32; NR];
        for j in 0..NR {
            lo[j] = f32::from_bits((wr[2 * j] as u32) << 16);
            hi[j] = f32::from_bits((wr[2 * j + 1] as u32) << 16);
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let (x0, x1) = (
                f32::from_bits(xs[i * ldx + 2 * r]),
                f32::from_bits(xs[i * ldx + 2 * r + 1]),
            );
            for j in 0..NR {
                a[j] += x0 * lo[j] + x1 * hi[j];
            }
        }
    }
    acc
}

/// # Safety
/// As [`bf16_block`] (portable rows: `r ≤ MR_PORTABLE`).
#[inline(always)]
unsafe fn bf16_portable(r: usize, xs: &[u32], ldx: usize, w: &[u16], kp: usize, blk: &Block) {
    macro_rules! go {
        ($n:literal) => {{
            let acc = bf16_portable_rows::<$n>(xs, ldx, w, kp);
            for (i, a) in acc.iter().enumerate() {
                // SAFETY: the caller's contract.
                unsafe { blk.store_row(i, a) };
            }
        }};
    }
    match r {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        _ => go!(4),
    }
}

/// bf16 widened with AVX2+FMA, for `r ≤ MR_AVX2` rows, each 16-column half of the
/// panel in turn ([`bf16_half_avx2`]), as the float32 AVX2 kernel covers it. Used for
/// more than one row: one row runs [`bf16_wide_row_avx2`].
///
/// # Safety
/// As [`bf16_block`] (`r ≤ MR_AVX2`); the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_wide_avx2(r: usize, xs: &[u32], ldx: usize, w: &[u16], kp: usize, blk: &Block) {
    for h in 0..blk.ncols.div_ceil(16) {
        macro_rules! go {
            ($($n:literal)*) => {
                match r {
                    // SAFETY: the caller's contract.
                    $($n => unsafe { bf16_half_avx2::<$n>(xs.as_ptr(), ldx, w.as_ptr(), kp, blk, h) },)*
                    _ => unreachable!("r <= MR_AVX2"),
                }
            };
        }
        go!(1 2 3 4 5 6);
    }
}

/// Columns `16h .. 16h + 16` of a bf16 block: per pair row two 32-byte loads (8
/// columns × 2 inputs each), each widened to two float32 vectors (a shift for the
/// low halves, a mask for the high ones) that every row's two broadcasts multiply:
/// R × 2 accumulators, as the float32 AVX2 kernel's 6 × 16 tile.
///
/// # Safety
/// As [`bf16_block`] (`R ≤ MR_AVX2`, `16h < blk.ncols`); the CPU must have AVX2 and
/// FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_half_avx2<const R: usize>(
    xs: *const u32,
    ldx: usize,
    w: *const u16,
    kp: usize,
    blk: &Block,
    h: usize,
) {
    // SAFETY: loads stay inside w (kp pair rows of 2 · NR values; this half's 16
    // columns at 32h) and xs (R rows of ldx ≥ 2·kp values); stores go through
    // `Block::store_row` (the caller's contract for y).
    unsafe {
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for r in 0..kp {
            let wr = w.add(r * 2 * NR + 32 * h);
            let wv: [__m256i; 2] =
                std::array::from_fn(|v| _mm256_loadu_si256(wr.add(16 * v).cast()));
            let lo = wv.map(|v| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)));
            let up = wv.map(|v| _mm256_castsi256_ps(_mm256_and_si256(v, hi)));
            for (i, a) in acc.iter_mut().enumerate() {
                let xr = xs.add(i * ldx + 2 * r).cast::<f32>();
                let x0 = _mm256_broadcast_ss(&*xr);
                let x1 = _mm256_broadcast_ss(&*xr.add(1));
                for v in 0..2 {
                    a[v] = _mm256_fmadd_ps(x1, up[v], _mm256_fmadd_ps(x0, lo[v], a[v]));
                }
            }
        }
        // The half's columns of every row, through the portable store (bias or the
        // earlier k-blocks' sums, ragged last columns).
        let half = Block {
            y: blk.y.add(16 * h),
            ncols: 16.min(blk.ncols - 16 * h),
            bias: blk.bias.map(|b| &b[16 * h..]),
            ..*blk
        };
        for (i, a) in acc.iter().enumerate() {
            let mut row = [0f32; NR];
            _mm256_storeu_ps(row.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), a[1]);
            half.store_row(i, &row);
        }
    }
}

/// One row of a bf16 block with AVX2+FMA (batch 1 on CPUs without AVX-512): per pair
/// row four 32-byte loads (8 columns × 2 inputs each), prefetched ahead, each widened
/// to two float32 vectors with an accumulator of its own, so no FMA waits on another.
/// One 2048 × 2048 layer on one thread (`cargo test --release --lib qdense::bench --
/// --ignored --nocapture`, AMD Zen 5 VM): 0.093 ms on the portable kernel compiled for
/// AVX2 (which one row ran before), 0.076 ms with this; two interleaved streams with
/// two FMAs chained per accumulator took 0.143 ms.
///
/// # Safety
/// As [`bf16_block`] with one row; the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_wide_row_avx2(xs: *const u32, w: *const u16, kp: usize, blk: &Block) {
    // SAFETY: every pair row read is < kp: inside xs (2·kp values) and w (kp · 64
    // values); the store goes through `Block::store_row` (the caller's contract for y).
    unsafe {
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let xf = xs.cast::<f32>();
        let mut lo_acc = [_mm256_setzero_ps(); 4];
        let mut up_acc = [_mm256_setzero_ps(); 4];
        for r in 0..kp {
            let wr = w.add(r * 2 * NR);
            prefetch_row(wr.cast());
            let x0 = _mm256_broadcast_ss(&*xf.add(2 * r));
            let x1 = _mm256_broadcast_ss(&*xf.add(2 * r + 1));
            for c in 0..4 {
                let v = _mm256_loadu_si256(wr.add(16 * c).cast());
                let lo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                let up = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
                lo_acc[c] = _mm256_fmadd_ps(x0, lo, lo_acc[c]);
                up_acc[c] = _mm256_fmadd_ps(x1, up, up_acc[c]);
            }
        }
        let mut row = [0f32; NR];
        for c in 0..4 {
            let v = _mm256_add_ps(lo_acc[c], up_acc[c]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8 * c), v);
        }
        blk.store_row(0, &row);
    }
}

// ---- AVX-512 kernels -----------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Column masks of the two 16-column halves of a panel with `ncols` columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks(ncols: usize) -> (__mmask16, __mmask16) {
    let m = |c: usize| -> __mmask16 {
        if c >= 16 {
            0xFFFF
        } else {
            ((1u32 << c) - 1) as __mmask16
        }
    };
    (m(ncols), m(ncols.saturating_sub(16)))
}

/// `y = base + acc` for `R` rows of two 16-column accumulators.
///
/// # Safety
/// As [`bf16_block`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store<const R: usize>(acc: &[[__m512; 2]; R], blk: &Block) {
    let (m0, m1) = masks(blk.ncols);
    // SAFETY: masked loads and stores touch only the block's ncols columns of its R
    // rows of y, and of the bias slice (ncols long).
    unsafe {
        let ld = |p: *const f32, m: __mmask16| _mm512_maskz_loadu_ps(m, p);
        for (i, a) in acc.iter().enumerate() {
            let y = blk.y.add(i * blk.ldy);
            let (b0, b1) = if blk.first {
                match blk.bias {
                    Some(b) => (ld(b.as_ptr(), m0), ld(b.as_ptr().add(16), m1)),
                    None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
                }
            } else {
                (ld(y, m0), ld(y.add(16), m1))
            };
            _mm512_mask_storeu_ps(y, m0, _mm512_add_ps(a[0], b0));
            _mm512_mask_storeu_ps(y.add(16), m1, _mm512_add_ps(a[1], b1));
        }
    }
}

/// bf16 with `vdpbf16ps`: per pair row, two 64-byte weight loads, and per row one
/// broadcast pair and two dot products.
///
/// # Safety
/// As [`bf16_block`]; the CPU must have AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot<const R: usize>(
    xs: *const u32,
    ldx: usize,
    w: *const u16,
    kp: usize,
    blk: &Block,
) {
    // SAFETY: reads stay inside xs (R rows of ldx ≥ kp pairs) and w (kp · 64 values);
    // __m512i and __m512bh are both 64 bytes of plain data.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for r in 0..kp {
            let wr = w.add(r * 2 * NR);
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wr.cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wr.add(NR).cast()));
            for (i, a) in acc.iter_mut().enumerate() {
                let xp: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xs.add(i * ldx + r) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], xp, w0);
                a[1] = _mm512_dpbf16_ps(a[1], xp, w1);
            }
        }
        store::<R>(&acc, blk);
    }
}

/// Streams of the one-row bf16 kernels, each with its own accumulators.
const DOT_STREAMS: usize = 4;

/// The one-row kernels' walk over a panel's `kp` pair rows: `DOT_STREAMS` interleaved
/// ranges, `step(acc[s], row, prefetch)` for stream `s`'s rows, then the rows left over
/// on stream 0 (not prefetched: they are the panel's last).
#[inline(always)]
fn by_streams<A>(kp: usize, acc: &mut [A; DOT_STREAMS], mut step: impl FnMut(&mut A, usize, bool)) {
    let q = kp / DOT_STREAMS;
    for i in 0..q {
        for (s, a) in acc.iter_mut().enumerate() {
            step(a, s * q + i, true);
        }
    }
    for r in DOT_STREAMS * q..kp {
        step(&mut acc[0], r, false);
    }
}

/// [`bf16_dot`] for one row (batch 1, memory-bound): the panel's `kp` pair rows read
/// as `DOT_STREAMS` interleaved ranges, each with its own two accumulators (summed at
/// the end) and each prefetched `PF_AHEAD` bytes ahead, as the fp32 batch-1 kernel
/// reads its panels (`ops::dense`, `gemv_panel`). The bf16 head at batch 1 through the
/// worker, alternating builds (`benchmarks/ab_workers.py --bundle bf16`, Intel Xeon
/// VM): 0.270–0.293 → 0.263–0.276 ms; 2 or 8 streams, or 4 without the prefetches,
/// gained nothing.
///
/// # Safety
/// As [`bf16_block`] with one row; the CPU must have AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot_row(xs: *const u32, w: *const u16, kp: usize, blk: &Block) {
    // SAFETY: every pair row read is < kp: inside xs (kp pairs) and w (kp · 64
    // values); __m512i and __m512bh are both 64 bytes of plain data.
    unsafe {
        let dot = |a: &mut [__m512; 2], r: usize, prefetch: bool| {
            let wr = w.add(r * 2 * NR);
            if prefetch {
                prefetch_row(wr.cast());
            }
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wr.cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wr.add(NR).cast()));
            let xp: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xs.add(r) as i32));
            a[0] = _mm512_dpbf16_ps(a[0], xp, w0);
            a[1] = _mm512_dpbf16_ps(a[1], xp, w1);
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; DOT_STREAMS];
        by_streams(kp, &mut acc, dot);
        let mut sum = [[_mm512_setzero_ps(); 2]; 1];
        for a in &acc {
            sum[0][0] = _mm512_add_ps(sum[0][0], a[0]);
            sum[0][1] = _mm512_add_ps(sum[0][1], a[1]);
        }
        store::<1>(&sum, blk);
    }
}

/// bf16 widened: each 64-byte load (16 columns × 2 rows) becomes two float32 vectors
/// (a shift for the low halves, a mask for the high ones), used by FMA; `xs` holds
/// the rounded inputs' float32 bits.
///
/// # Safety
/// As [`bf16_block`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_wide<const R: usize>(
    xs: *const u32,
    ldx: usize,
    w: *const u16,
    kp: usize,
    blk: &Block,
) {
    // SAFETY: as bf16_dot.
    unsafe {
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for r in 0..kp {
            let wr = w.add(r * 2 * NR);
            let v0 = _mm512_loadu_si512(wr.cast());
            let v1 = _mm512_loadu_si512(wr.add(NR).cast());
            let (a0, b0) = (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0)),
                _mm512_castsi512_ps(_mm512_and_si512(v0, hi)),
            );
            let (a1, b1) = (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1)),
                _mm512_castsi512_ps(_mm512_and_si512(v1, hi)),
            );
            for (i, a) in acc.iter_mut().enumerate() {
                let xr = xs.add(i * ldx + 2 * r).cast::<f32>();
                let x0 = _mm512_set1_ps(*xr);
                let x1 = _mm512_set1_ps(*xr.add(1));
                a[0] = _mm512_fmadd_ps(x1, b0, _mm512_fmadd_ps(x0, a0, a[0]));
                a[1] = _mm512_fmadd_ps(x1, b1, _mm512_fmadd_ps(x0, a1, a[1]));
            }
        }
        store::<R>(&acc, blk);
    }
}

/// [`bf16_wide`] for one row (batch 1, on AVX-512 CPUs without AVX512_BF16: Skylake
/// to Ice Lake Xeons): the panel read as [`bf16_dot_row`] reads it, in `DOT_STREAMS`
/// interleaved ranges, each prefetched, and with four accumulators per stream (the low
/// and high halves of each load apart), so no FMA waits on another. `bf16_wide` with
/// one row chains two FMAs per accumulator per pair row and is bound by their latency:
/// one 2048 × 2048 layer on one thread (`cargo test --release --lib qdense::bench --
/// --ignored --nocapture`, AMD Zen 5 VM) took 0.117 ms with it, against 0.068 ms with
/// `vdpbf16ps` and 0.133 ms in float32; 0.072–0.078 ms with this kernel.
///
/// # Safety
/// As [`bf16_block`] with one row; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_wide_row(xs: *const u32, w: *const u16, kp: usize, blk: &Block) {
    // SAFETY: every pair row read is < kp: inside xs (2·kp values) and w (kp · 64
    // values).
    unsafe {
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let xf = xs.cast::<f32>();
        let fma = |a: &mut [__m512; 4], r: usize, prefetch: bool| {
            let wr = w.add(r * 2 * NR);
            if prefetch {
                prefetch_row(wr.cast());
            }
            let v0 = _mm512_loadu_si512(wr.cast());
            let v1 = _mm512_loadu_si512(wr.add(NR).cast());
            let x0 = _mm512_set1_ps(*xf.add(2 * r));
            let x1 = _mm512_set1_ps(*xf.add(2 * r + 1));
            let lo = |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            let up = |v| _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            a[0] = _mm512_fmadd_ps(x0, lo(v0), a[0]);
            a[1] = _mm512_fmadd_ps(x0, lo(v1), a[1]);
            a[2] = _mm512_fmadd_ps(x1, up(v0), a[2]);
            a[3] = _mm512_fmadd_ps(x1, up(v1), a[3]);
        };
        let mut acc = [[_mm512_setzero_ps(); 4]; DOT_STREAMS];
        by_streams(kp, &mut acc, fma);
        let mut sum = [[_mm512_setzero_ps(); 2]; 1];
        for a in &acc {
            sum[0][0] = _mm512_add_ps(sum[0][0], _mm512_add_ps(a[0], a[2]));
            sum[0][1] = _mm512_add_ps(sum[0][1], _mm512_add_ps(a[1], a[3]));
        }
        store::<1>(&sum, blk);
    }
}

// ---- AMX -----------------------------------------------------------------------------

/// bf16 with AMX tiles: `tdpbf16ps` multiplies a 16-row × 32-input tile of bf16 `x`
/// (A) by a 16-pair-row × 16-column tile of the panel (B: the `panels32x2` layout is
/// exactly B's, 128 bytes per pair row, the two column halves 64 bytes apart) into a
/// 16 × 16 float32 tile (C). Up to 32 rows × 32 columns per call: C tiles tmm0–tmm3,
/// A tiles tmm4–tmm5, B tiles tmm6–tmm7. The stable `std::arch` has no AMX
/// intrinsics, hence `asm!`; nothing else in the program uses tile registers.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::int8::QLayout;
    use super::{Aligned, Block, NR};
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    /// How many groups of 16 weight rows ahead the int8 tiles prefetch.
    const PF_GROUPS: usize = 2;

    /// Palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    const CFG: TileCfg = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileCfg(c)
    };

    /// Load the tile configuration on this thread.
    ///
    /// # Safety
    /// AMX must have been enabled ([`super::enable_amx`]).
    pub(super) unsafe fn configure() {
        // SAFETY: the caller's contract; CFG is a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{cfg}]", cfg = in(reg) &CFG, options(nostack, readonly)) };
    }

    /// Release this thread's tile state.
    ///
    /// # Safety
    /// AMX must have been enabled ([`super::enable_amx`]).
    pub(super) unsafe fn release() {
        // SAFETY: the caller's contract; tilerelease only resets tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// The tile product of up to 32 rows of `a` (laid out as `al` says; a u32 holds a
    /// bf16 pair or four int8 values) × the panel's 32 columns over `wrows` weight
    /// rows of 128 bytes (`w`), into `c` (32 rows of 32 float32 or int32, row stride
    /// `NR`), added to what `c` holds when `load_c` (partial sums over earlier weight
    /// rows), else replacing it. `INT8`: `tdpbssd` (int8 × int8 summed in int32), else
    /// `tdpbf16ps`.
    ///
    /// # Safety
    /// AMX enabled (and AMX-INT8 for `INT8`), this thread's tiles configured
    /// ([`configure`]); `a` holds the 16 rows (32 when `rows > 16`) of every group of
    /// `wrows` rounded up to 16 (zero past `wrows` and in rows past `rows`).
    unsafe fn tiles<const INT8: bool>(
        a: &[u32],
        al: QLayout,
        w: &[u8],
        wrows: usize,
        rows: usize,
        c: &mut [u32; 32 * NR],
        load_c: bool,
    ) {
        const WROW: usize = 4 * NR; // bytes per weight row
        let two = rows > 16;
        let groups = wrows.div_ceil(16);
        assert!((1..=32).contains(&rows) && w.len() >= wrows * WROW);
        let last = if two { al.ts } else { 0 } + (groups - 1) * al.gs + 15 * al.lda + 16;
        assert!(a.len() >= last);
        let full = wrows / 16;
        let (lda_b, ldc_b) = (al.lda * 4, NR * 4);
        // One group: A tiles tmm4 (rows 0..16) and tmm5 (16..32), B tiles tmm6
        // (columns 0..16) and tmm7 (16..32) from `b`, 16 weight rows of 128 bytes.
        let group = |g: usize, b: *const u8| {
            // SAFETY: every tile load reads 16 rows of 64 bytes at the given stride
            // inside a (asserted above: group g < groups) or w (b: a full group of w
            // or the padded copy below); the configuration is a valid palette-1 layout.
            unsafe {
                let a0 = a.as_ptr().add(g * al.gs);
                asm!(
                    "tileloadd tmm4, [{a} + {lda}*1]",
                    "tileloadd tmm6, [{b} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    a = in(reg) a0,
                    lda = in(reg) lda_b,
                    b = in(reg) b,
                    b1 = in(reg) b.add(WROW / 2),
                    ldb = in(reg) WROW,
                    options(nostack, readonly)
                );
                if two {
                    asm!(
                        "tileloadd tmm5, [{a} + {lda}*1]",
                        a = in(reg) a0.add(al.ts),
                        lda = in(reg) lda_b,
                        options(nostack, readonly)
                    );
                }
                match (INT8, two) {
                    (true, false) => asm!(
                        "tdpbssd tmm0, tmm4, tmm6",
                        "tdpbssd tmm1, tmm4, tmm7",
                        options(nostack, nomem)
                    ),
                    (true, true) => asm!(
                        "tdpbssd tmm0, tmm4, tmm6",
                        "tdpbssd tmm1, tmm4, tmm7",
                        "tdpbssd tmm2, tmm5, tmm6",
                        "tdpbssd tmm3, tmm5, tmm7",
                        options(nostack, nomem)
                    ),
                    (false, false) => asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        options(nostack, nomem)
                    ),
                    (false, true) => asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        options(nostack, nomem)
                    ),
                }
            }
        };
        let cp = c.as_mut_ptr();
        if load_c {
            // SAFETY: every load reads 16 rows of 64 bytes inside c (32 rows of NR u32).
            unsafe {
                asm!(
                    "tileloadd tmm0, [{c0} + {ldc}*1]",
                    "tileloadd tmm1, [{c1} + {ldc}*1]",
                    "tileloadd tmm2, [{c2} + {ldc}*1]",
                    "tileloadd tmm3, [{c3} + {ldc}*1]",
                    c0 = in(reg) cp,
                    c1 = in(reg) cp.add(16),
                    c2 = in(reg) cp.add(16 * NR),
                    c3 = in(reg) cp.add(16 * NR + 16),
                    ldc = in(reg) ldc_b,
                    options(nostack, readonly)
                );
            }
        } else {
            // SAFETY: tilezero only writes tile registers.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
        }
        for g in 0..full {
            if INT8 && g + PF_GROUPS < full {
                // The weights of PF_GROUPS groups ahead into L1: a tile load waits for
                // its 16 lines, so the panel streams from L3 faster with the lines
                // requested early (64×2048×2048, 2 threads: about 5–8% less time).
                let ahead = w[(g + PF_GROUPS) * 16 * WROW..].as_ptr();
                for l in 0..16 * WROW / 64 {
                    // SAFETY: prefetching reads nothing and cannot fault; SSE is part of
                    // x86_64.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l).cast()) };
                }
            }
            group(g, w[g * 16 * WROW..].as_ptr());
        }
        if full < groups {
            // The last group of weight rows, zero-padded to 16 (reading past wrows
            // would leave the panel block).
            let mut tail = Aligned([0u8; 16 * WROW]);
            tail.0[..(wrows - full * 16) * WROW]
                .copy_from_slice(&w[full * 16 * WROW..wrows * WROW]);
            group(full, tail.0.as_ptr());
        }
        // SAFETY: every store writes 16 rows of 64 bytes inside c (32 rows of NR u32).
        unsafe {
            asm!(
                "tilestored [{c0} + {ldc}*1], tmm0",
                "tilestored [{c1} + {ldc}*1], tmm1",
                "tilestored [{c2} + {ldc}*1], tmm2",
                "tilestored [{c3} + {ldc}*1], tmm3",
                c0 = in(reg) cp,
                c1 = in(reg) cp.add(16),
                c2 = in(reg) cp.add(16 * NR),
                c3 = in(reg) cp.add(16 * NR + 16),
                ldc = in(reg) ldc_b,
                options(nostack)
            );
        }
    }

    /// One bf16 block of `rows` ≤ 32 rows × the panel's 32 columns over `kp` pair
    /// rows.
    ///
    /// # Safety
    /// As `bf16_block`, and as [`tiles`] (`xs`: `a`, `kp`: `wrows`).
    pub(super) unsafe fn bf16_block(
        xs: &[u32],
        ldx: usize,
        w: &[u16],
        kp: usize,
        rows: usize,
        blk: &Block,
    ) {
        let mut c = Aligned([0u32; 32 * NR]);
        // SAFETY: the same bytes as w, alignment 1; the caller's contract.
        unsafe {
            let wb = std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len() * 2);
            let al = QLayout {
                lda: ldx,
                gs: 16,
                ts: 16 * ldx,
            };
            tiles::<false>(xs, al, wb, kp, rows, &mut c.0, false);
        }
        let c = c.0.map(f32::from_bits);
        for i in 0..rows {
            let row = Block {
                // SAFETY (pointer arithmetic only): row i of the block.
                y: unsafe { blk.y.add(i * blk.ldy) },
                ..*blk
            };
            // SAFETY: c row i is 32 floats; the caller's contract covers y's row i;
            // AMX implies AVX-512F.
            unsafe { store_c(&c[i * NR..(i + 1) * NR], &row) };
        }
    }

    /// One int8 block: the int32 sums of `rows` ≤ 32 rows (`xs`: signed quads laid out
    /// as `al` says) × the panel's 32 columns over `kq` quad rows (`w`) into `acc`,
    /// added to its sums when `load_c`.
    ///
    /// # Safety
    /// As [`tiles`] (`xs`: `a`, `kq`: `wrows`), and the CPU has AMX-INT8.
    pub(super) unsafe fn int8_block(
        xs: &[u32],
        al: QLayout,
        w: &[i8],
        kq: usize,
        rows: usize,
        acc: &mut [i32; 32 * NR],
        load_c: bool,
    ) {
        // SAFETY: the same bytes as w (alignment 1) and as acc (i32 and u32 have the
        // same size and alignment, every bit pattern valid); the caller's contract.
        unsafe {
            let wb = std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len());
            let c = &mut *(acc as *mut [i32; 32 * NR]).cast::<[u32; 32 * NR]>();
            tiles::<true>(xs, al, wb, kq, rows, c, load_c);
        }
    }

    /// `store` for one row of 32 accumulators in memory.
    ///
    /// # Safety
    /// `acc` has 32 floats, `blk.y` is valid for `ncols` writes, the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_c(acc: &[f32], blk: &Block) {
        use std::arch::x86_64::_mm512_loadu_ps;
        assert!(acc.len() >= NR);
        // SAFETY: the caller's contract; two 16-float loads inside acc.
        unsafe {
            let a = [[
                _mm512_loadu_ps(acc.as_ptr()),
                _mm512_loadu_ps(acc.as_ptr().add(16)),
            ]];
            super::store::<1>(&a, blk);
        }
    }
}

// ---- convolution ---------------------------------------------------------------------

/// `conv` (one group) with a quantised kernel `[kh·kw·c, cout]`: im2col (as the
/// float32 conv does) and [`qdense`], rows split across threads.
#[allow(clippy::too_many_arguments)]
pub fn qconv(
    x: &[f32],
    w: QKernel<'_>,
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
    assert!(p.groups == 1 && x.len() >= batch * g.in_len() && y.len() >= rows * cout);
    let y = &mut y[..rows * cout];
    let fused = !matches!(p.act, Act::Softmax { .. });
    let act = if fused { &p.act } else { &Act::Linear };
    let kl = p.k_len();
    let gemm = |cols: &[f32], yr: &mut [f32]| {
        let m = yr.len() / cout;
        qdense(cols, w, bias, yr, m, kl, cout, 1);
    };
    if p.is_pointwise() {
        let parts = threads.min(rows / 64).max(1);
        par_row_ranges(y, cout, parts, &|first, yr| {
            let m = yr.len() / cout;
            gemm(&x[first * kl..(first + m) * kl], yr);
            act.apply(yr);
        });
    } else {
        conv::blocked(x, y, p, scratch, threads, act, &gemm);
    }
    if !fused {
        p.act.apply(y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Pack a row-major `k × n` matrix into `[ceil(n/32), ceil(k/g), 32, g]`.
    fn pack<T: Copy + Default>(w: &[T], k: usize, n: usize, g: usize) -> Vec<T> {
        let (np, kg) = (n.div_ceil(NR), k.div_ceil(g));
        let mut out = vec![T::default(); np * kg * NR * g];
        for i in 0..k {
            for j in 0..n {
                out[((j / NR * kg + i / g) * NR + j % NR) * g + i % g] = w[i * n + j];
            }
        }
        out
    }

    fn bf(v: u16) -> f64 {
        f32::from_bits((v as u32) << 16) as f64
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7F80);
    }

    #[test]
    fn fast_packing_rounds_as_the_scalar_one() {
        let mut x = vals(70, 9);
        x[..8].copy_from_slice(&[
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -0.0,
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX,
            3.4e38,
            -1.0 - 1.0 / 256.0,
        ]); // fmt: skip
        let mut fast = vec![0u32; 35];
        let done = pack_pairs_fast(&x, &mut fast);
        for r in 0..done {
            let want = bf16_bits(x[2 * r]) as u32 | (bf16_bits(x[2 * r + 1]) as u32) << 16;
            assert_eq!(fast[r], want, "pair {r}");
        }
    }

    /// Every bf16 path against a float64 product of the same bf16 values, over shapes
    /// with partial panels, odd k, k-blocks and row chunks.
    #[test]
    fn bf16_every_path_matches_float64() {
        enable_amx();
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 33),
            // One row's streams: a tail after them, fewer pairs than streams.
            (1, 13, 45),
            (1, 6, 32),
            // One row stages all of k (ragged), or KC_BF16 at a time past RB·KC_BF16;
            // 65 rows end with a one-row chunk.
            (1, 1000, 70),
            (1, 16500, 20),
            (65, 300, 40),
            (3, 300, 70),
            (13, 513, 64),
            (50, 129, 31),
            (64, 64, 96),
            (40, 40, 40),
        ] {
            let x = vals(m * k, 1);
            let wf = vals(k * n, 2);
            let bias = vals(n, 3);
            let wb: Vec<u16> = wf.iter().map(|&v| bf16_bits(v)).collect();
            let pb = pack(&wb, k, n, 2);
            for path in available() {
                for threads in [1, 2] {
                    let mut y = vec![f32::NAN; m * n];
                    qdense_with(
                        path,
                        &x,
                        QKernel::Bf16(&pb),
                        Some(&bias),
                        &mut y,
                        m,
                        k,
                        n,
                        threads,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = bias[j] as f64
                                + (0..k)
                                    .map(|l| bf(bf16_bits(x[i * k + l])) * bf(wb[l * n + j]))
                                    .sum::<f64>();
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "bf16 {path:?} {m}x{k}x{n} [{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The dynamic quantisation of one row as the reference executor does it.
    fn quantise_ref(x: &[f32]) -> (Vec<i32>, f32) {
        let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
        if amax == 0.0 {
            return (vec![0; x.len()], 0.0);
        }
        let inv = 127f32 / amax;
        let q = x
            .iter()
            .map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32);
        (q.collect(), amax / 127f32)
    }

    /// Every int8 path against the exact integer sums of the same quantised values:
    /// k not a multiple of 4 or 64, partial panels, all-zero rows, and batches that
    /// leave partial blocks of every kernel (1, 2, 17, 64, more than a row chunk).
    #[test]
    fn int8_every_path_matches_exact_sums() {
        enable_amx();
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 33),
            (2, 300, 70),
            (17, 513, 64),
            (64, 129, 31),
            (64, 64, 96),
            (40, 40, 40),
            (70, 65, 17),
            (3, 2048, 67),
            // Quantised by two tasks (m · k ≥ 2^16), split at a tile of 16 rows (AMX's
            // tile order) with a ragged last tile and k not a multiple of 64.
            (50, 1400, 40),
            (33, 2100, 20),
            // Few panels: two tasks own rows in whole blocks (AMX: 32, VNNI: 12),
            // ragged last block.
            (150, 300, 67),
            (130, 130, 40),
            (64, 2048, 67),
            // AMX, two blocks of 32 rows: k in blocks of 512 inputs with the partial
            // sums kept between them; exactly two blocks, and a second block of one
            // quad (a ragged group) with a ragged second row block.
            (64, 1024, 64),
            (40, 516, 33),
        ] {
            let mut x = vals(m * k, 1);
            if m > 1 {
                x[k..2 * k].fill(0.0); // a row of zeros: scale 0, outputs = bias
            }
            let q: Vec<i8> = vals(k * n, 2)
                .iter()
                .map(|&v| (v * 127.0).round() as i8)
                .collect();
            let bias = vals(n, 3);
            let scale: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            let pq = pack(&q, k, n, 4);
            let w = QKernel::Int8 {
                q: &pq,
                scale: &scale,
            };
            for path in available() {
                for threads in [1, 2] {
                    let mut y = vec![f32::NAN; m * n];
                    qdense_with(path, &x, w, Some(&bias), &mut y, m, k, n, threads);
                    for i in 0..m {
                        let (qx, sx) = quantise_ref(&x[i * k..(i + 1) * k]);
                        for j in 0..n {
                            let acc: i64 = (0..k).map(|l| qx[l] as i64 * q[l * n + j] as i64).sum();
                            let want = acc as f64 * (sx * scale[j]) as f64 + bias[j] as f64;
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                                "int8 {path:?} {m}x{k}x{n} [{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// With a row scale of exactly 1 (max|x| = 127) and column scales of 1 the
    /// outputs are the integer sums themselves: any error in the int32 arithmetic
    /// (the +128 correction of the VNNI kernels, tile edges) shows exactly.
    #[test]
    fn int8_integer_sums_are_exact() {
        enable_amx();
        let (m, k, n) = (33, 1000, 45);
        let mut x: Vec<f32> = vals(m * k, 4)
            .iter()
            .map(|&v| (v * 127.0).round())
            .collect();
        for i in 0..m {
            x[i * k + i] = if i % 2 == 0 { 127.0 } else { -127.0 };
        }
        let q: Vec<i8> = vals(k * n, 5)
            .iter()
            .map(|&v| (v * 127.0).round() as i8)
            .collect();
        let pq = pack(&q, k, n, 4);
        let ones = vec![1f32; n];
        for path in available() {
            let mut y = vec![f32::NAN; m * n];
            let w = QKernel::Int8 {
                q: &pq,
                scale: &ones,
            };
            qdense_with(path, &x, w, None, &mut y, m, k, n, 2);
            for i in 0..m {
                for j in 0..n {
                    let want: i64 = (0..k)
                        .map(|l| x[i * k + l] as i64 * q[l * n + j] as i64)
                        .sum();
                    assert_eq!(y[i * n + j], want as f32, "{path:?} [{i},{j}]");
                }
            }
        }
    }

    /// A NaN or an infinity in a row makes that row's outputs NaN, as in float32;
    /// the other rows are unaffected.
    #[test]
    fn int8_non_finite_rows_give_nan() {
        let (m, k, n) = (3, 20, 5);
        let mut x = vals(m * k, 6);
        x[3] = f32::NAN;
        x[k + 4] = f32::INFINITY;
        let pq = pack(&vec![1i8; k * n], k, n, 4);
        let scale = vec![0.5f32; n];
        for path in available() {
            let mut y = vec![0f32; m * n];
            let w = QKernel::Int8 {
                q: &pq,
                scale: &scale,
            };
            qdense_with(path, &x, w, None, &mut y, m, k, n, 1);
            assert!(y[..2 * n].iter().all(|v| v.is_nan()), "{path:?}");
            assert!(y[2 * n..].iter().all(|v| v.is_finite()), "{path:?}");
        }
    }

    /// The vectorised quantisation equals the reference one value for value (ties to
    /// even: x · 127 / amax = n + 0.5 with amax = 127) in both layouts, signed and
    /// +128, whole groups of 64 inputs and the ragged end of a row; the plain Rust
    /// code too (which CPUs without AVX-512BW run).
    #[test]
    fn quantised_rows_match_reference() {
        let (m, k) = (19, 200);
        let mut x = vals(m * k, 11);
        for i in 0..m {
            let row = &mut x[i * k..(i + 1) * k];
            row.iter_mut().for_each(|v| *v *= 100.0);
            row[0] = 127.0;
            for (j, v) in row.iter_mut().enumerate().skip(1).step_by(3) {
                *v = (j % 250) as f32 - 124.5; // ties
            }
        }
        for tiles in [false, true] {
            let lay = if tiles {
                int8::QLayout::tiles(k)
            } else {
                int8::QLayout::rows(k)
            };
            for (unsigned, portable) in [(false, false), (true, false), (false, true), (true, true)]
            {
                let mut q = vec![0u32; lay.len(m, k)];
                let mut sx = vec![0f32; m];
                if portable {
                    int8::quantise_rows_portable(&x, k, &mut q, lay, &mut sx, unsigned);
                } else {
                    int8::quantise_rows(&x, k, &mut q, lay, &mut sx, unsigned);
                }
                for i in 0..m {
                    let (want, s) = quantise_ref(&x[i * k..(i + 1) * k]);
                    assert_eq!(sx[i], s);
                    for (j, &w) in want.iter().enumerate() {
                        let quad =
                            q[i / 16 * lay.ts + i % 16 * lay.lda + j / 64 * lay.gs + j % 64 / 4];
                        let b = quad.to_le_bytes()[j % 4] ^ if unsigned { 0x80 } else { 0 };
                        assert_eq!(b as i8 as i32, w, "{tiles} {portable} row {i} input {j}");
                    }
                }
            }
        }
    }

    /// The fused ReLU of every path and both weight types equals `Act::Relu` applied
    /// to the plain result, bit for bit, NaN rows (→ 0) included; ragged shapes,
    /// one and two tasks, and k = 0 (the bias alone).
    #[test]
    fn fused_relu_matches_act_relu() {
        enable_amx();
        for &(m, k, n) in &[
            (1, 7, 33),
            (3, 20, 5),
            (17, 513, 64),
            (70, 65, 17),
            (50, 1400, 40),
            (33, 2100, 67),
            (150, 300, 67),
            (2, 0, 9),
        ] {
            let mut x = vals(m * k, 7);
            if k > 4 {
                x[3] = f32::NAN; // row 0's outputs are NaN
            }
            let bias = vals(n, 8);
            let q: Vec<i8> = vals(k * n, 9)
                .iter()
                .map(|&v| (v * 127.0).round() as i8)
                .collect();
            let pq = pack(&q, k, n, 4);
            let scale: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            let wb: Vec<u16> = vals(k * n, 9).iter().map(|&v| bf16_bits(v)).collect();
            let pb = pack(&wb, k, n, 2);
            let kernels = [
                QKernel::Int8 {
                    q: &pq,
                    scale: &scale,
                },
                QKernel::Bf16(&pb),
            ];
            for w in kernels {
                for path in available() {
                    for threads in [1, 2] {
                        let mut want = vec![f32::NAN; m * n];
                        qdense_with(path, &x, w, Some(&bias), &mut want, m, k, n, threads);
                        Act::Relu.apply(&mut want);
                        // With a buffer of its own, then with the executor's scratch
                        // holding garbage from an earlier layer (NaN bits everywhere).
                        let mut dirty = vec![f32::NAN; scratch_len(m, k)];
                        for s in [&mut [][..], &mut dirty[..]] {
                            let mut got = vec![f32::NAN; m * n];
                            let b = Some(&bias[..]);
                            qdense_act_with(path, &x, w, b, &mut got, m, k, n, threads, true, s);
                            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                                let at = format!("{path:?} {m}x{k}x{n} [{i}]");
                                assert_eq!(g.to_bits(), e.to_bits(), "{at}");
                            }
                            if k > 4 {
                                assert!(got[..n].iter().all(|&v| v == 0.0), "{path:?} NaN row");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test --release --lib qdense::bench -- --ignored --nocapture`: the best of
    /// many runs of each path against the float32 dense kernel (single thread).
    #[test]
    #[ignore]
    fn timings() {
        enable_amx();
        let (k, n) = (2048, 2048);
        let wf: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let wp = crate::ops::dense::pack_panels(&wf, k, n);
        let wb = vec![0x3F80u16; n.div_ceil(NR) * k.div_ceil(2) * 2 * NR];
        let q = vec![3i8; n.div_ceil(NR) * k.div_ceil(4) * 4 * NR];
        let scale = vec![0.01f32; n];
        for m in [1usize, 64] {
            let x = vec![0.5f32; m * k];
            let mut y = vec![0f32; m * n];
            let best = |f: &mut dyn FnMut()| {
                let mut b = f64::MAX;
                for _ in 0..(if m == 1 { 200 } else { 20 }) {
                    let t = std::time::Instant::now();
                    f();
                    b = b.min(t.elapsed().as_secs_f64());
                }
                b * 1e3
            };
            let t = best(&mut || {
                crate::ops::dense::dense(
                    &x,
                    crate::ops::dense::Kernel::Panels(&wp),
                    None,
                    &mut y,
                    m,
                    k,
                    n,
                    1,
                )
            });
            println!("m={m} fp32 {t:.3} ms");
            for path in available() {
                let t = best(&mut || {
                    qdense_with(path, &x, QKernel::Bf16(&wb), None, &mut y, m, k, n, 1)
                });
                let t8 = best(&mut || {
                    qdense_with(
                        path,
                        &x,
                        QKernel::Int8 {
                            q: &q,
                            scale: &scale,
                        },
                        None,
                        &mut y,
                        m,
                        k,
                        n,
                        1,
                    )
                });
                println!("m={m} {path:?} bf16 {t:.3} ms int8 {t8:.3} ms");
            }
            {
                let kern = int8::Kernel::choose(path(), m);
                let lay = int8::QLayout::tiles(k);
                let mut xq = vec![0u32; lay.len(m.next_multiple_of(32), k)];
                let mut sx = vec![0f32; m];
                let t = best(&mut || {
                    int8::quantise_rows(&x, k, &mut xq, lay, &mut sx, kern.unsigned())
                });
                println!("m={m} int8 activation quantisation {t:.3} ms");
            }
        }
    }
}
