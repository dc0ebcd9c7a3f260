//! Elementwise binary ops with numpy broadcasting, folded left over 2+ inputs.
//!
//! At load time every operand gets a `Bcast`: the output's per-sample dims, collapsed
//! where possible, and the operand's stride along each (0 where it is broadcast),
//! plus its per-sample stride (0 for constants, which have no batch dim).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinKind {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    /// 1 where a == b, else 0 (`equal`).
    Equal,
}

impl BinKind {
    pub fn from_op(op: &str) -> Option<Self> {
        Some(match op {
            "add" => BinKind::Add,
            "sub" => BinKind::Sub,
            "mul" => BinKind::Mul,
            "div" => BinKind::Div,
            "max" => BinKind::Max,
            "min" => BinKind::Min,
            "pow" => BinKind::Pow,
            "equal" => BinKind::Equal,
            _ => return None,
        })
    }
    /// `add`, `mul`, `max`, `min` take 2 or more inputs; the others exactly 2.
    pub fn variadic(self) -> bool {
        matches!(
            self,
            BinKind::Add | BinKind::Mul | BinKind::Max | BinKind::Min
        )
    }
}

#[inline(always)]
fn f(kind: BinKind, a: f32, b: f32) -> f32 {
    match kind {
        BinKind::Add => a + b,
        BinKind::Sub => a - b,
        BinKind::Mul => a * b,
        BinKind::Div => a / b,
        // numpy.maximum / minimum propagate NaN
        BinKind::Max => {
            if a.is_nan() || a > b {
                a
            } else {
                b
            }
        }
        BinKind::Min => {
            if a.is_nan() || a < b {
                a
            } else {
                b
            }
        }
        BinKind::Pow => a.powf(b),
        BinKind::Equal => {
            if a == b {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// How one operand maps onto the output. `dims` multiply to the output's per-sample
/// size; `strides[i]` is the operand's stride along `dims[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bcast {
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
    pub batch_stride: usize,
}

impl Bcast {
    /// `out_dims`: output per-sample dims; `op_dims`: operand dims already aligned to
    /// `out_dims` (same length, each equal or 1); `batched`: whether the operand has
    /// a batch dim.
    pub fn new(out_dims: &[usize], op_dims: &[usize], batched: bool) -> Self {
        let mut strides = vec![0usize; op_dims.len()];
        let mut s = 1usize;
        for i in (0..op_dims.len()).rev() {
            strides[i] = if op_dims[i] == 1 { 0 } else { s };
            s *= op_dims[i];
        }
        let batch_stride = if batched { s } else { 0 };
        let mut dims: Vec<usize> = Vec::new();
        let mut st: Vec<usize> = Vec::new();
        for (&d, &s) in out_dims.iter().zip(&strides) {
            if d == 1 {
                continue;
            }
            if let (Some(ld), Some(ls)) = (dims.last_mut(), st.last_mut()) {
                if *ls == s * d {
                    *ld *= d;
                    *ls = s;
                    continue;
                }
            }
            dims.push(d);
            st.push(s);
        }
        if dims.is_empty() {
            dims.push(1);
            st.push(0);
        }
        Bcast {
            dims,
            strides: st,
            batch_stride,
        }
    }

    fn out_len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Operand is laid out exactly like the output.
    fn is_full(&self) -> bool {
        self.dims.len() == 1 && self.strides[0] == 1 && self.batch_stride == self.dims[0]
    }
}

/// Visit every innermost run: `g(out_offset, operand_offset, len, operand_stride)`.
#[inline(always)]
fn runs(bc: &Bcast, batch: usize, mut g: impl FnMut(usize, usize, usize, usize)) {
    let r = bc.dims.len();
    let inner = bc.dims[r - 1];
    let istride = bc.strides[r - 1];
    let per = bc.out_len();
    let mut idx = [0usize; 16];
    debug_assert!(r <= 16);
    for n in 0..batch {
        let mut o = n * per;
        let mut b = n * bc.batch_stride;
        idx.fill(0);
        'sample: loop {
            g(o, b, inner, istride);
            o += inner;
            // advance the counter over the outer dims, innermost first
            let mut d = r - 1;
            loop {
                if d == 0 {
                    break 'sample;
                }
                d -= 1;
                idx[d] += 1;
                b += bc.strides[d];
                if idx[d] < bc.dims[d] {
                    break;
                }
                b -= bc.strides[d] * bc.dims[d];
                idx[d] = 0;
            }
        }
    }
}

/// `out = a ⊕ b`, broadcasting. `out` holds `batch` samples of the output (pass
/// `batch = 1` for an unbatched output). Further inputs of a left fold are applied
/// with [`inplace`].
pub fn binary(
    kind: BinKind,
    out: &mut [f32],
    a: (&[f32], &Bcast),
    b: (&[f32], &Bcast),
    batch: usize,
) {
    let (a, abc) = a;
    let (b, bbc) = b;
    if abc.is_full() {
        let a = &a[..batch * abc.batch_stride];
        runs(bbc, batch, |o, bo, len, s| {
            let out = &mut out[o..o + len];
            let a = &a[o..o + len];
            if s == 1 {
                for ((y, &x), &v) in out.iter_mut().zip(a).zip(&b[bo..bo + len]) {
                    *y = f(kind, x, v);
                }
            } else {
                let v = b[bo];
                for (y, &x) in out.iter_mut().zip(a) {
                    *y = f(kind, x, v);
                }
            }
        });
    } else {
        broadcast_copy(out, (a, abc), batch);
        inplace(kind, out, (b, bbc), batch);
    }
}

/// `out = a` broadcast to the output (`expand`).
pub fn broadcast_copy(out: &mut [f32], a: (&[f32], &Bcast), batch: usize) {
    let (a, bc) = a;
    runs(bc, batch, |o, ao, len, s| {
        if s == 1 {
            out[o..o + len].copy_from_slice(&a[ao..ao + len]);
        } else {
            out[o..o + len].fill(a[ao]);
        }
    });
}

/// `where(cond, x, y)`: the three operands' strides along the output's per-sample
/// dims (0 where broadcast) and per sample (0 for constants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Select {
    pub dims: Vec<usize>,
    pub strides: [Vec<usize>; 3],
    pub batch_strides: [usize; 3],
}

impl Select {
    /// `op_dims`: each operand's dims aligned to `out_dims` (same length, each equal
    /// or 1); `batched`: whether it has a batch dim.
    pub fn new(out_dims: &[usize], op_dims: [&[usize]; 3], batched: [bool; 3]) -> Self {
        let mut strides: [Vec<usize>; 3] = Default::default();
        let mut batch_strides = [0; 3];
        for k in 0..3 {
            let d = op_dims[k];
            let mut st = vec![0usize; d.len()];
            let mut s = 1usize;
            for i in (0..d.len()).rev() {
                st[i] = if d[i] == 1 { 0 } else { s };
                s *= d[i];
            }
            batch_strides[k] = if batched[k] { s } else { 0 };
            strides[k] = st;
        }
        let mut dims = out_dims.to_vec();
        if dims.is_empty() {
            dims.push(1);
            strides.iter_mut().for_each(|s| s.push(0));
        }
        Select {
            dims,
            strides,
            batch_strides,
        }
    }
}

/// `out[i] = if c[i] != 0 { x[i] } else { y[i] }` with broadcasting (NaN counts as
/// true, as a cast to bool does).
pub fn select(out: &mut [f32], c: &[f32], x: &[f32], y: &[f32], s: &Select, batch: usize) {
    let r = s.dims.len();
    let inner = s.dims[r - 1];
    let per: usize = s.dims.iter().product();
    let ops = [c, x, y];
    let mut idx = [0usize; 16];
    debug_assert!(r <= 16);
    for n in 0..batch {
        let mut off = s.batch_strides.map(|b| n * b);
        let mut o = n * per;
        idx.fill(0);
        'sample: loop {
            let is = [
                s.strides[0][r - 1],
                s.strides[1][r - 1],
                s.strides[2][r - 1],
            ];
            for j in 0..inner {
                let cv = ops[0][off[0] + j * is[0]];
                out[o + j] = if cv != 0.0 {
                    ops[1][off[1] + j * is[1]]
                } else {
                    ops[2][off[2] + j * is[2]]
                };
            }
            o += inner;
            let mut d = r - 1;
            loop {
                if d == 0 {
                    break 'sample;
                }
                d -= 1;
                idx[d] += 1;
                for (o, st) in off.iter_mut().zip(&s.strides) {
                    *o += st[d];
                }
                if idx[d] < s.dims[d] {
                    break;
                }
                for (o, st) in off.iter_mut().zip(&s.strides) {
                    *o -= st[d] * s.dims[d];
                }
                idx[d] = 0;
            }
        }
    }
}

/// `out = out ⊕ b`, broadcasting `b`.
pub fn inplace(kind: BinKind, out: &mut [f32], b: (&[f32], &Bcast), batch: usize) {
    let (b, bc) = b;
    runs(bc, batch, |o, bo, len, s| {
        let out = &mut out[o..o + len];
        if s == 1 {
            for (y, &v) in out.iter_mut().zip(&b[bo..bo + len]) {
                *y = f(kind, *y, v);
            }
        } else {
            let v = b[bo];
            for y in out.iter_mut() {
                *y = f(kind, *y, v);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_shape_and_bias_like() {
        let out_dims = [2, 3];
        let full = Bcast::new(&out_dims, &[2, 3], true);
        let row = Bcast::new(&out_dims, &[1, 3], false);
        let col = Bcast::new(&out_dims, &[2, 1], false);
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut y = vec![0.0; 12];
        binary(
            BinKind::Add,
            &mut y,
            (&x, &full),
            (&[10.0, 20.0, 30.0], &row),
            2,
        );
        assert_eq!(y[..6], [10.0, 21.0, 32.0, 13.0, 24.0, 35.0]);
        assert_eq!(y[6..9], [16.0, 27.0, 38.0]);
        // constant first, batched second; 3 operands folded left
        binary(
            BinKind::Sub,
            &mut y,
            (&[100.0, 200.0], &col),
            (&x, &full),
            2,
        );
        assert_eq!(y[..6], [100.0, 99.0, 98.0, 197.0, 196.0, 195.0]);
        assert_eq!(y[6..], [94.0, 93.0, 92.0, 191.0, 190.0, 189.0]);
        let scalar = Bcast::new(&out_dims, &[1, 1], false);
        binary(BinKind::Max, &mut y, (&x, &full), (&[5.0], &scalar), 2);
        inplace(BinKind::Max, &mut y, (&[7.0, 0.0], &col), 2);
        assert_eq!(y[..6], [7.0, 7.0, 7.0, 5.0, 5.0, 5.0]);
        assert_eq!(y[6..], [7.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
    }

    #[test]
    fn equal_where_and_expand() {
        // cond [2, 1] (batched), x [1, 3] constant, y scalar constant, out [2, 3]
        let out_dims = [2, 3];
        let s = Select::new(&out_dims, [&[2, 1], &[1, 3], &[1, 1]], [true, false, false]);
        let c = [1.0, 0.0, f32::NAN, 0.0];
        let mut y = vec![0.0; 12];
        select(&mut y, &c, &[1.0, 2.0, 3.0], &[-9.0], &s, 2);
        assert_eq!(y[..6], [1.0, 2.0, 3.0, -9.0, -9.0, -9.0]);
        assert_eq!(y[6..], [1.0, 2.0, 3.0, -9.0, -9.0, -9.0]);
        let full = Bcast::new(&[3], &[3], true);
        let mut e = vec![0.0; 3];
        binary(
            BinKind::Equal,
            &mut e,
            (&[1.0, 2.0, 0.0], &full),
            (&[2.0], &Bcast::new(&[3], &[1], false)),
            1,
        );
        assert_eq!(e, [0.0, 1.0, 0.0]);
        let mut x = vec![0.0; 12];
        broadcast_copy(
            &mut x,
            (&[1.0, 2.0, 3.0, 4.0], &Bcast::new(&[3, 2], &[1, 2], true)),
            2,
        );
        assert_eq!(
            x,
            [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0]
        );
    }

    #[test]
    fn middle_axis_broadcast() {
        // out [2, 3, 2] per sample; operand [2, 1, 2] broadcast along the middle
        let out_dims = [2, 3, 2];
        let bc = Bcast::new(&out_dims, &[2, 1, 2], true);
        let b = [1.0, 2.0, 3.0, 4.0];
        let mut y = vec![0.0; 12];
        let half = Bcast::new(&out_dims, &[1, 1, 1], false);
        binary(BinKind::Add, &mut y, (&b, &bc), (&[0.5], &half), 1);
        assert_eq!(
            y,
            [1.5, 2.5, 1.5, 2.5, 1.5, 2.5, 3.5, 4.5, 3.5, 4.5, 3.5, 4.5]
        );
    }
}
