//! Transposed convolution: per chunk of samples, one GEMM per group
//! (`cols = x · kernel`, the `gemm` crate, as grouped convolutions use) into the
//! column buffer, then col2im adds every column into the output positions it
//! reaches, split across threads by output row (so no two threads write one value).
//!
//! 1-D ops run as 2-D ones with height 1. Geometry is validated by `program`.

use super::conv::Geom;
use super::{par_rows, parallelism, Act};

/// `g`: input `[h, w, c]`, output `[oh, ow, cout]`, kernel window, strides and
/// dilations; `pt`/`pl` are how many positions are cropped from the start of the
/// full output (`pads` begin).
#[derive(Clone, Debug, PartialEq)]
pub struct ConvTParams {
    pub g: Geom,
    pub cout: usize,
    pub groups: usize,
    pub act: Act,
}

/// Target size of the column buffer, in floats.
const SCRATCH_TARGET: usize = 1 << 21;

impl ConvTParams {
    /// Columns per input position and group (`kh·kw·cout/groups`).
    fn k_len(&self) -> usize {
        self.g.kh * self.g.kw * (self.cout / self.groups)
    }
    /// Samples per chunk for a batch of `batch`.
    fn chunk_samples(&self, batch: usize) -> usize {
        let per = (self.g.h * self.g.w * self.k_len()).max(1);
        (SCRATCH_TARGET / per).clamp(1, batch.max(1))
    }
    /// Scratch floats needed for batches up to `max_batch`.
    pub fn scratch_len(&self, max_batch: usize) -> usize {
        self.chunk_samples(max_batch) * self.g.h * self.g.w * self.k_len()
    }
}

/// `y[batch, oh, ow, cout] = conv_transpose(x[batch, h, w, c], kernel[c, kh, kw, cout/groups]) + bias`.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose(
    x: &[f32],
    kernel: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    batch: usize,
    p: &ConvTParams,
    scratch: &mut [f32],
    threads: usize,
) {
    let g = &p.g;
    let cout = p.cout;
    let (cig, cog) = (g.c / p.groups, cout / p.groups);
    let kl = p.k_len();
    let hw = g.h * g.w;
    let out_len = g.oh * g.ow * cout;
    assert!(x.len() >= batch * hw * g.c && y.len() >= batch * out_len);
    assert!(kernel.len() >= g.c * kl && bias.is_none_or(|b| b.len() >= cout));
    let y = &mut y[..batch * out_len];
    match bias {
        Some(b) => y
            .chunks_exact_mut(cout)
            .for_each(|r| r.copy_from_slice(&b[..cout])),
        None => y.fill(0.0),
    }
    let chunk = p.chunk_samples(batch);
    assert!(scratch.len() >= chunk * hw * kl);
    for n0 in (0..batch).step_by(chunk) {
        let nb = chunk.min(batch - n0);
        let rows = nb * hw;
        for gi in 0..p.groups {
            let cols = &mut scratch[..rows * kl];
            // SAFETY: cols is rows×kl (asserted above); x holds rows×c floats from
            // sample n0 on, the group's channels lie inside each row; the group's
            // kernel block is cig×kl contiguous inside kernel (asserted length);
            // cols is a distinct &mut borrow, aliasing neither.
            unsafe {
                gemm::gemm(
                    rows,
                    kl,
                    cig,
                    cols.as_mut_ptr(),
                    1,
                    kl as isize,
                    false,
                    x.as_ptr().add(n0 * hw * g.c + gi * cig),
                    1,
                    g.c as isize,
                    kernel.as_ptr().add(gi * cig * kl),
                    1,
                    kl as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    parallelism(threads),
                )
            }
            let ys = &mut y[n0 * out_len..(n0 + nb) * out_len];
            col2im(cols, ys, gi * cog, cog, kl, p, threads);
        }
    }
    p.act.apply(y);
}

/// Add the columns of one group (output channels `c0..c0+cog`) into `y`, whose
/// rows (sample, output row) are split across threads.
fn col2im(
    cols: &[f32],
    y: &mut [f32],
    c0: usize,
    cog: usize,
    kl: usize,
    p: &ConvTParams,
    threads: usize,
) {
    let g = &p.g;
    let cout = p.cout;
    let row_len = g.ow * cout;
    let rows = y.len() / row_len.max(1);
    let parts = threads.clamp(1, (rows * row_len / 16384).clamp(1, rows.max(1)));
    par_rows(y, row_len, parts, &|r, yrow| {
        let (n, oh) = (r / g.oh, r % g.oh);
        for ki in 0..g.kh {
            // Input row ih reaches full-output row ih·sh + ki·dh = oh + pt.
            let Some(t) = (oh + g.pt).checked_sub(ki * g.dh) else {
                continue;
            };
            if !t.is_multiple_of(g.sh) || t / g.sh >= g.h {
                continue;
            }
            let ih = t / g.sh;
            let src_row = &cols[(n * g.h + ih) * g.w * kl..][..g.w * kl];
            for iw in 0..g.w {
                let src = &src_row[iw * kl..][..kl];
                for kj in 0..g.kw {
                    let Some(ow) = (iw * g.sw + kj * g.dw).checked_sub(g.pl) else {
                        continue;
                    };
                    if ow >= g.ow {
                        continue;
                    }
                    let s = &src[(ki * g.kw + kj) * cog..][..cog];
                    let d = &mut yrow[ow * cout + c0..][..cog];
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o += v;
                    }
                }
            }
        }
    });
}
