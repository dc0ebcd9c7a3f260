//! Resize (nearest or linear) of 1-D `[w, c]` and 2-D `[h, w, c]` channels-last
//! samples. Each output row and column reads at most two input rows / columns; the
//! taps (which two, and the weight of the second) are computed once, at load.

use super::par_rows;

/// How an output coordinate maps to an input coordinate (ONNX
/// `coordinate_transformation_mode`; docs/enclave-program.md, `resize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coord {
    Asymmetric,
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    TfHalfPixelForNn,
}

impl Coord {
    pub fn parse(s: &str) -> Option<Coord> {
        Some(match s {
            "asymmetric" => Coord::Asymmetric,
            "half_pixel" => Coord::HalfPixel,
            "pytorch_half_pixel" => Coord::PytorchHalfPixel,
            "align_corners" => Coord::AlignCorners,
            "tf_half_pixel_for_nn" => Coord::TfHalfPixelForNn,
            _ => return None,
        })
    }

    /// The input coordinate of output index `o` (`scale` = output / input length).
    pub fn source(self, o: usize, in_len: usize, out_len: usize, scale: f64) -> f64 {
        let o = o as f64;
        match self {
            Coord::Asymmetric => o / scale,
            Coord::HalfPixel => (o + 0.5) / scale - 0.5,
            Coord::PytorchHalfPixel if out_len > 1 => (o + 0.5) / scale - 0.5,
            Coord::PytorchHalfPixel => 0.0,
            Coord::AlignCorners if out_len > 1 => o * (in_len - 1) as f64 / (out_len - 1) as f64,
            Coord::AlignCorners => 0.0,
            Coord::TfHalfPixelForNn => (o + 0.5) / scale,
        }
    }
}

/// How `mode: nearest` rounds an input coordinate (ONNX `nearest_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

impl Rounding {
    pub fn parse(s: &str) -> Option<Rounding> {
        Some(match s {
            "round_prefer_floor" => Rounding::RoundPreferFloor,
            "round_prefer_ceil" => Rounding::RoundPreferCeil,
            "floor" => Rounding::Floor,
            "ceil" => Rounding::Ceil,
            _ => return None,
        })
    }

    fn apply(self, x: f64) -> f64 {
        match self {
            Rounding::RoundPreferFloor if x - x.floor() == 0.5 => x.floor(),
            Rounding::RoundPreferCeil if x - x.floor() == 0.5 => x.ceil(),
            Rounding::RoundPreferFloor | Rounding::RoundPreferCeil => x.round(),
            Rounding::Floor => x.floor(),
            Rounding::Ceil => x.ceil(),
        }
    }
}

/// One output row or column: `(1 - f)·x[i0] + f·x[i1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tap {
    pub i0: usize,
    pub i1: usize,
    pub f: f32,
}

/// The taps of one axis resized from `in_len` to `out_len`; `nearest`: the rounding
/// for mode nearest, None for linear. Coordinates outside `[0, in_len - 1]` are
/// clamped (linear) or their index is (nearest): edge values repeat.
pub fn taps(
    in_len: usize,
    out_len: usize,
    scale: f64,
    coord: Coord,
    nearest: Option<Rounding>,
) -> Vec<Tap> {
    let last = in_len.saturating_sub(1) as f64;
    (0..out_len)
        .map(|o| {
            let x = coord.source(o, in_len, out_len, scale);
            match nearest {
                Some(r) => {
                    let i = r.apply(x).clamp(0.0, last) as usize;
                    Tap {
                        i0: i,
                        i1: i,
                        f: 0.0,
                    }
                }
                None => {
                    let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, last) };
                    let i0 = x.floor() as usize;
                    let i1 = (i0 + 1).min(in_len.saturating_sub(1));
                    Tap {
                        i0,
                        i1,
                        f: (x - i0 as f64) as f32,
                    }
                }
            }
        })
        .collect()
}

/// A resize of `[h, w, c]` samples to `[rows.len(), cols.len(), c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Resize {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub rows: Vec<Tap>,
    pub cols: Vec<Tap>,
    pub linear: bool,
}

/// `y[batch, oh, ow, c] = resize(x[batch, h, w, c])`.
pub fn resize(x: &[f32], y: &mut [f32], batch: usize, r: &Resize, threads: usize) {
    let (oh, ow, c) = (r.rows.len(), r.cols.len(), r.c);
    let in_len = r.h * r.w * c;
    let row_len = ow * c;
    let rows = batch * oh;
    assert!(x.len() >= batch * in_len && y.len() >= rows * row_len);
    if row_len == 0 || in_len == 0 {
        return;
    }
    let parts = threads.clamp(1, (rows * row_len / 16384).clamp(1, rows.max(1)));
    let in_row = r.w * c;
    par_rows(&mut y[..rows * row_len], row_len, parts, &|ri, yrow| {
        let (n, o) = (ri / oh, ri % oh);
        let xs = &x[n * in_len..][..in_len];
        let t = r.rows[o];
        let a = &xs[t.i0 * in_row..][..in_row];
        if !r.linear {
            for (out, u) in yrow.chunks_exact_mut(c).zip(&r.cols) {
                out.copy_from_slice(&a[u.i0 * c..][..c]);
            }
            return;
        }
        let b = &xs[t.i1 * in_row..][..in_row];
        let fh = t.f;
        for (out, u) in yrow.chunks_exact_mut(c).zip(&r.cols) {
            let fw = u.f;
            let (w00, w01) = ((1.0 - fh) * (1.0 - fw), (1.0 - fh) * fw);
            let (w10, w11) = (fh * (1.0 - fw), fh * fw);
            let (a0, a1) = (&a[u.i0 * c..][..c], &a[u.i1 * c..][..c]);
            let (b0, b1) = (&b[u.i0 * c..][..c], &b[u.i1 * c..][..c]);
            for k in 0..c {
                out[k] = w00 * a0[k] + w01 * a1[k] + w10 * b0[k] + w11 * b1[k];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_follow_the_coordinate_modes() {
        // 2x nearest, asymmetric + floor: repeat each element.
        let t = taps(3, 6, 2.0, Coord::Asymmetric, Some(Rounding::Floor));
        let i: Vec<usize> = t.iter().map(|t| t.i0).collect();
        assert_eq!(i, [0, 0, 1, 1, 2, 2]);
        // linear half_pixel: -0.25 clamps to 0, 0.25 is a quarter of the way.
        let t = taps(3, 6, 2.0, Coord::HalfPixel, None);
        assert_eq!((t[0].i0, t[0].i1, t[0].f), (0, 1, 0.0));
        assert_eq!((t[1].i0, t[1].i1, t[1].f), (0, 1, 0.25));
        assert_eq!((t[5].i0, t[5].i1, t[5].f), (2, 2, 0.0));
        // align_corners hits both ends exactly.
        let t = taps(3, 5, 5.0 / 3.0, Coord::AlignCorners, None);
        assert_eq!((t[2].i0, t[2].f), (1, 0.0));
        assert_eq!((t[4].i0, t[4].f), (2, 0.0));
        // round_prefer_ceil vs floor at a tie (asymmetric, 0.5).
        let c = taps(
            2,
            4,
            2.0,
            Coord::Asymmetric,
            Some(Rounding::RoundPreferCeil),
        );
        let f = taps(
            2,
            4,
            2.0,
            Coord::Asymmetric,
            Some(Rounding::RoundPreferFloor),
        );
        assert_eq!((c[1].i0, f[1].i0), (1, 0));
    }
}
