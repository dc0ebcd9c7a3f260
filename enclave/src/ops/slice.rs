//! Strided slice of the per-sample dims: every output element reads one input
//! element at `base + Σ index·step` (steps may be negative).

/// A slice of `in_len`-float samples to samples of dims `out_dims`.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub in_len: usize,
    pub out_dims: Vec<usize>,
    /// Input offset of the first output element.
    pub base: usize,
    /// Input offset step along each output dim (input stride × slice step).
    pub steps: Vec<isize>,
}

impl Slice {
    /// `starts[i]`, `steps[i]`, `sizes[i]` per input dim `in_dims[i]` (validated by
    /// `program`: every index taken lies inside the dim).
    pub fn new(in_dims: &[usize], starts: &[usize], steps: &[isize], sizes: &[usize]) -> Slice {
        let mut stride = 1usize;
        let mut strides = vec![0usize; in_dims.len()];
        for i in (0..in_dims.len()).rev() {
            strides[i] = stride;
            stride *= in_dims[i];
        }
        Slice {
            in_len: stride,
            out_dims: sizes.to_vec(),
            base: starts.iter().zip(&strides).map(|(s, t)| s * t).sum(),
            steps: steps
                .iter()
                .zip(&strides)
                .map(|(&s, &t)| s * t as isize)
                .collect(),
        }
    }

    pub fn out_len(&self) -> usize {
        self.out_dims.iter().product()
    }
}

pub fn slice(x: &[f32], y: &mut [f32], batch: usize, s: &Slice) {
    let out_len = s.out_len();
    let r = s.out_dims.len();
    assert!(x.len() >= batch * s.in_len && y.len() >= batch * out_len && r <= 16);
    if out_len == 0 {
        return;
    }
    let (inner, istep) = if r == 0 {
        (1, 0)
    } else {
        (s.out_dims[r - 1], s.steps[r - 1])
    };
    for n in 0..batch {
        let xs = &x[n * s.in_len..][..s.in_len];
        let ys = &mut y[n * out_len..][..out_len];
        let mut idx = [0usize; 16];
        let mut off = s.base as isize;
        for row in ys.chunks_exact_mut(inner) {
            if istep == 1 {
                row.copy_from_slice(&xs[off as usize..][..inner]);
            } else {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = xs[(off + j as isize * istep) as usize];
                }
            }
            // Advance the outer index (all dims but the last), row-major.
            let mut d = r.saturating_sub(1);
            while d > 0 {
                d -= 1;
                idx[d] += 1;
                off += s.steps[d];
                if idx[d] < s.out_dims[d] {
                    break;
                }
                off -= s.steps[d] * s.out_dims[d] as isize;
                idx[d] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_and_reversed() {
        // [3, 4] -> rows 2, 0 (step -2), columns 1, 2, 3
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let s = Slice::new(&[3, 4], &[2, 1], &[-2, 1], &[2, 3]);
        let mut y = vec![0.0; 6];
        slice(&x, &mut y, 1, &s);
        assert_eq!(y, [9.0, 10.0, 11.0, 1.0, 2.0, 3.0]);
        // columns 3, 1 reversed with step -2
        let s = Slice::new(&[3, 4], &[0, 3], &[1, -2], &[3, 2]);
        let mut y = vec![0.0; 6];
        slice(&x, &mut y, 1, &s);
        assert_eq!(y, [3.0, 1.0, 7.0, 5.0, 11.0, 9.0]);
    }
}
