//! Layout and normalisation ops: transpose, pad, concat, reduce, layer_norm,
//! scale_shift. All work per sample on `[batch, dims...]` buffers.

/// Call `f(k, off)` for every index of `dims[..r-1]` in row-major order, `k`
/// counting from 0 and `off` = Σ index·strides (the last dim is the caller's).
#[inline(always)]
fn walk_outer(dims: &[usize], strides: &[usize], mut f: impl FnMut(usize, usize)) {
    let r = dims.len();
    if r == 0 {
        f(0, 0);
        return;
    }
    let mut idx = [0usize; 16];
    let mut off = 0usize;
    let mut k = 0usize;
    'all: loop {
        f(k, off);
        k += 1;
        let mut d = r - 1;
        loop {
            if d == 0 {
                break 'all;
            }
            d -= 1;
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
}

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Transpose of the per-sample dims: output dim `j` is input dim `perm[j]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transpose {
    /// Output per-sample dims.
    pub out_dims: Vec<usize>,
    /// Input stride along each output dim.
    pub in_strides: Vec<usize>,
    pub sample: usize,
}

impl Transpose {
    pub fn new(in_dims: &[usize], perm: &[usize]) -> Self {
        let s = row_major_strides(in_dims);
        Transpose {
            out_dims: perm.iter().map(|&p| in_dims[p]).collect(),
            in_strides: perm.iter().map(|&p| s[p]).collect(),
            sample: in_dims.iter().product(),
        }
    }
}

pub fn transpose(x: &[f32], y: &mut [f32], batch: usize, t: &Transpose) {
    let r = t.out_dims.len();
    let (inner, istride) = if r == 0 {
        (1, 0)
    } else {
        (t.out_dims[r - 1], t.in_strides[r - 1])
    };
    for n in 0..batch {
        let xs = &x[n * t.sample..][..t.sample];
        let ys = &mut y[n * t.sample..][..t.sample];
        walk_outer(&t.out_dims, &t.in_strides, |k, off| {
            let row = &mut ys[k * inner..][..inner];
            for (j, v) in row.iter_mut().enumerate() {
                *v = xs[off + j * istride];
            }
        });
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pad {
    pub in_dims: Vec<usize>,
    pub out_dims: Vec<usize>,
    /// Offset in the output sample of the input's first element.
    pub base: usize,
    /// Output stride along each input dim.
    pub out_strides: Vec<usize>,
    pub value: f32,
}

impl Pad {
    pub fn new(in_dims: &[usize], begins: &[usize], ends: &[usize], value: f32) -> Self {
        let out_dims: Vec<usize> = (0..in_dims.len())
            .map(|i| in_dims[i] + begins[i] + ends[i])
            .collect();
        let out_strides = row_major_strides(&out_dims);
        let base = begins.iter().zip(&out_strides).map(|(b, s)| b * s).sum();
        Pad {
            in_dims: in_dims.to_vec(),
            out_dims,
            base,
            out_strides,
            value,
        }
    }
}

pub fn pad(x: &[f32], y: &mut [f32], batch: usize, p: &Pad) {
    let isz: usize = p.in_dims.iter().product();
    let osz: usize = p.out_dims.iter().product();
    let inner = p.in_dims.last().copied().unwrap_or(1);
    for n in 0..batch {
        let xs = &x[n * isz..][..isz];
        let ys = &mut y[n * osz..][..osz];
        ys.fill(p.value);
        walk_outer(&p.in_dims, &p.out_strides, |k, off| {
            ys[p.base + off..][..inner].copy_from_slice(&xs[k * inner..][..inner]);
        });
    }
}

/// One input of a concatenation: `blocks` blocks of `part` floats from `x` go to
/// offset `offset` of each `total`-float block of `y`.
pub fn concat_one(
    x: &[f32],
    y: &mut [f32],
    blocks: usize,
    part: usize,
    offset: usize,
    total: usize,
) {
    for blk in 0..blocks {
        y[blk * total + offset..][..part].copy_from_slice(&x[blk * part..][..part]);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    Mean,
    Sum,
    Max,
    Min,
}

/// A reduction over some per-sample axes, with adjacent axes of the same kind
/// (reduced or kept) merged.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduce {
    pub kind: ReduceKind,
    pub dims: Vec<usize>,
    /// Output stride along each dim (0 for reduced dims).
    pub out_strides: Vec<usize>,
    pub in_sample: usize,
    pub out_sample: usize,
    pub count: usize,
}

impl Reduce {
    pub fn new(kind: ReduceKind, in_dims: &[usize], reduced: &[bool]) -> Self {
        let mut dims: Vec<usize> = Vec::new();
        let mut red: Vec<bool> = Vec::new();
        for (&d, &r) in in_dims.iter().zip(reduced) {
            if d == 1 {
                continue;
            }
            if red.last() == Some(&r) {
                *dims.last_mut().unwrap_or(&mut 0) *= d;
            } else {
                dims.push(d);
                red.push(r);
            }
        }
        if dims.is_empty() {
            dims.push(1);
            red.push(false);
        }
        let mut out_strides = vec![0usize; dims.len()];
        let mut s = 1;
        for i in (0..dims.len()).rev() {
            if !red[i] {
                out_strides[i] = s;
                s *= dims[i];
            }
        }
        let in_sample: usize = in_dims.iter().product();
        let count = in_dims
            .iter()
            .zip(reduced)
            .filter(|(_, &r)| r)
            .map(|(&d, _)| d)
            .product();
        Reduce {
            kind,
            dims,
            out_strides,
            in_sample,
            out_sample: s,
            count,
        }
    }
}

pub fn reduce(x: &[f32], y: &mut [f32], batch: usize, r: &Reduce) {
    let init = match r.kind {
        ReduceKind::Mean | ReduceKind::Sum => 0.0,
        ReduceKind::Max => f32::NEG_INFINITY,
        ReduceKind::Min => f32::INFINITY,
    };
    let last = r.dims.len() - 1;
    let inner = r.dims[last];
    let ostride = r.out_strides[last];
    for n in 0..batch {
        let xs = &x[n * r.in_sample..][..r.in_sample];
        let ys = &mut y[n * r.out_sample..][..r.out_sample];
        ys.fill(init);
        walk_outer(&r.dims, &r.out_strides, |k, off| {
            let row = &xs[k * inner..][..inner];
            match (r.kind, ostride) {
                (ReduceKind::Mean | ReduceKind::Sum, 0) => ys[off] += row.iter().sum::<f32>(),
                (ReduceKind::Mean | ReduceKind::Sum, _) => ys[off..off + inner]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, v)| *o += v),
                (ReduceKind::Max, 0) => ys[off] = row.iter().fold(ys[off], |a, &v| fmax(a, v)),
                (ReduceKind::Max, _) => ys[off..off + inner]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, &v)| *o = fmax(*o, v)),
                (ReduceKind::Min, 0) => ys[off] = row.iter().fold(ys[off], |a, &v| fmin(a, v)),
                (ReduceKind::Min, _) => ys[off..off + inner]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, &v)| *o = fmin(*o, v)),
            }
        });
        if r.kind == ReduceKind::Mean {
            let c = 1.0 / r.count as f32;
            ys.iter_mut().for_each(|v| *v *= c);
        }
    }
}

#[inline]
fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || a > b {
        a
    } else {
        b
    }
}
#[inline]
fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || a < b {
        a
    } else {
        b
    }
}

/// Layer norm over rows of `inner` floats: `y = (x − mean) / √(var + eps) · gamma + beta`.
pub fn layer_norm(
    x: &[f32],
    y: &mut [f32],
    inner: usize,
    eps: f32,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
) {
    if inner == 0 {
        return;
    }
    super::vmath::layer_norm_rows(x, y, inner, eps, gamma, beta);
}

/// `y = x·scale[c] + shift[c]` on `[outer, c, inner]`.
pub fn scale_shift(x: &[f32], y: &mut [f32], c: usize, inner: usize, scale: &[f32], shift: &[f32]) {
    let blk = c * inner;
    if blk == 0 {
        return;
    }
    for (yb, xb) in y.chunks_exact_mut(blk).zip(x.chunks_exact(blk)) {
        if inner == 1 {
            for (((o, &v), &s), &t) in yb.iter_mut().zip(xb).zip(scale).zip(shift) {
                *o = v * s + t;
            }
        } else {
            for ch in 0..c {
                let (s, t) = (scale[ch], shift[ch]);
                for (o, &v) in yb[ch * inner..][..inner]
                    .iter_mut()
                    .zip(&xb[ch * inner..][..inner])
                {
                    *o = v * s + t;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_2x3() {
        let t = Transpose::new(&[2, 3], &[1, 0]);
        let x = [
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        ];
        let mut y = [0.0; 12];
        transpose(&x, &mut y, 2, &t);
        assert_eq!(
            y,
            [0.0, 3.0, 1.0, 4.0, 2.0, 5.0, 10.0, 13.0, 11.0, 14.0, 12.0, 15.0]
        );
        assert_eq!(t.out_dims, [3, 2]);
    }

    #[test]
    fn transpose_3d_channels_first_to_last() {
        // [C=2, H=2, W=3] -> [H, W, C]
        let t = Transpose::new(&[2, 2, 3], &[1, 2, 0]);
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut y = vec![0.0; 12];
        transpose(&x, &mut y, 1, &t);
        for h in 0..2 {
            for w in 0..3 {
                for c in 0..2 {
                    assert_eq!(y[(h * 3 + w) * 2 + c], x[(c * 2 + h) * 3 + w]);
                }
            }
        }
    }

    #[test]
    fn pad_2d() {
        let p = Pad::new(&[1, 2], &[1, 0], &[0, 1], -1.0);
        let mut y = vec![0.0; 6];
        pad(&[5.0, 6.0], &mut y, 1, &p);
        assert_eq!(y, [-1.0, -1.0, -1.0, 5.0, 6.0, -1.0]);
    }

    #[test]
    fn concat_axis_last() {
        let a = [1.0, 2.0, 3.0, 4.0]; // [2, 2]
        let b = [9.0, 8.0]; // [2, 1]
        let mut y = [0.0; 6];
        concat_one(&a, &mut y, 2, 2, 0, 3);
        concat_one(&b, &mut y, 2, 1, 2, 3);
        assert_eq!(y, [1.0, 2.0, 9.0, 3.0, 4.0, 8.0]);
    }

    #[test]
    fn reduce_axes() {
        // [2, 3] per sample
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut y = [0.0; 3];
        reduce(
            &x,
            &mut y,
            1,
            &Reduce::new(ReduceKind::Sum, &[2, 3], &[true, false]),
        );
        assert_eq!(y, [5.0, 7.0, 9.0]);
        let mut y = [0.0; 2];
        reduce(
            &x,
            &mut y,
            1,
            &Reduce::new(ReduceKind::Mean, &[2, 3], &[false, true]),
        );
        assert_eq!(y, [2.0, 5.0]);
        let mut y = [0.0; 1];
        reduce(
            &x,
            &mut y,
            1,
            &Reduce::new(ReduceKind::Max, &[2, 3], &[true, true]),
        );
        assert_eq!(y, [6.0]);
        let mut y = [0.0; 2];
        reduce(
            &x,
            &mut y,
            1,
            &Reduce::new(ReduceKind::Min, &[2, 3], &[false, true]),
        );
        assert_eq!(y, [1.0, 4.0]);
        // [2, 2, 2] reduce middle
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let mut y = [0.0; 4];
        reduce(
            &x,
            &mut y,
            1,
            &Reduce::new(ReduceKind::Sum, &[2, 2, 2], &[false, true, false]),
        );
        assert_eq!(y, [2.0, 4.0, 10.0, 12.0]);
    }

    #[test]
    fn layer_norm_row() {
        let mut y = [0.0; 2];
        layer_norm(
            &[1.0, 3.0],
            &mut y,
            2,
            0.0,
            Some(&[2.0, 2.0]),
            Some(&[1.0, 1.0]),
        );
        assert!((y[0] + 1.0).abs() < 1e-6 && (y[1] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn scale_shift_axis() {
        let mut y = [0.0; 4];
        scale_shift(
            &[1.0, 2.0, 3.0, 4.0],
            &mut y,
            2,
            1,
            &[2.0, 3.0],
            &[0.5, 0.0],
        );
        assert_eq!(y, [2.5, 6.0, 6.5, 12.0]);
        scale_shift(
            &[1.0, 2.0, 3.0, 4.0],
            &mut y,
            2,
            2,
            &[2.0, 3.0],
            &[0.0, 1.0],
        );
        assert_eq!(y, [2.0, 4.0, 10.0, 13.0]);
    }
}
