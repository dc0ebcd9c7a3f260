//! Nodes that move data without arithmetic: constant, reshape, transpose, pad, concat,
//! slice.

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{axis, checked_product, float, int, list, list_n, pos, uint};
use super::{Error, Op, TensorMeta, MAX_RANK};
use crate::ops::misc::{Pad, Transpose};
use crate::ops::slice::Slice;

impl Builder<'_> {
    /// `constant`: a weight as a tensor without a batch dimension.
    pub(super) fn constant(&mut self, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        if !args.is_empty() {
            return ctx.e("a constant takes no inputs");
        }
        let Some(key) = ctx.weight_key("value")? else {
            return ctx.e("missing weight \"value\"");
        };
        let (w, shape) = self.weight(key, ctx)?;
        Ok((Op::Constant, (shape, false, Some(w))))
    }

    /// `reshape`: a new per-sample shape (one -1 inferred), same elements.
    pub(super) fn reshape(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let shape = list(ctx.req("shape")?, &ctx.what("shape"))?;
        if shape.len() + 1 > MAX_RANK {
            return ctx.e("reshape target rank is too large");
        }
        let total = x.sample_len();
        let mut od = Vec::new();
        let mut infer = None;
        for (i, v) in shape.iter().enumerate() {
            if v.as_i64() == Some(-1) {
                if infer.replace(i).is_some() {
                    return ctx.e("reshape has more than one -1");
                }
                od.push(1);
            } else {
                od.push(pos(v, &ctx.what("shape"))?);
            }
        }
        let known = checked_product(&od, &ctx.what("shape"))?;
        if let Some(i) = infer {
            if !total.is_multiple_of(known) {
                return ctx.e(format!("cannot reshape {d:?} to {od:?}"));
            }
            od[i] = total / known;
        }
        if od.iter().product::<usize>() != total {
            return ctx.e(format!("cannot reshape {d:?} ({total} elements) to {od:?}"));
        }
        Ok((Op::Copy, batched(od)))
    }

    /// `transpose`: a permutation that keeps the batch axis first.
    pub(super) fn transpose(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let rank = d.len() + 1;
        let perm = list_n(ctx.req("perm")?, rank, &ctx.what("perm"))?;
        let mut p = Vec::with_capacity(rank);
        let mut seen = vec![false; rank];
        for v in perm {
            let a = uint(v, &ctx.what("perm"))?;
            if a >= rank || seen[a] {
                return ctx.e("perm is not a permutation");
            }
            seen[a] = true;
            p.push(a);
        }
        if p[0] != 0 {
            return ctx.e("perm must keep the batch axis first (perm[0] == 0)");
        }
        let sub: Vec<usize> = p[1..].iter().map(|&a| a - 1).collect();
        let t = Transpose::new(d, &sub);
        let od = t.out_dims.clone();
        Ok((Op::Transpose(t), batched(od)))
    }

    /// `pad`: constant padding before and after every non-batch axis.
    pub(super) fn pad(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let pads = list_n(ctx.req("pads")?, d.len(), &ctx.what("pads"))?;
        let (mut b, mut e) = (Vec::new(), Vec::new());
        for p in pads {
            let p = list_n(p, 2, &ctx.what("pads"))?;
            b.push(uint(&p[0], &ctx.what("pads"))?);
            e.push(uint(&p[1], &ctx.what("pads"))?);
        }
        let value = match ctx.attr("value") {
            Some(v) => float(v, &ctx.what("value"))?,
            None => 0.0,
        };
        let od: Vec<usize> = (0..d.len()).map(|i| d[i] + b[i] + e[i]).collect();
        checked_product(&od, &ctx.what("pads"))?;
        let p = Pad::new(d, &b, &e, value);
        Ok((Op::Pad(p), batched(od)))
    }

    /// `concat`: two or more batched inputs along a non-batch axis.
    pub(super) fn concat(&mut self, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        if args.len() < 2 {
            return ctx.e("concat takes 2 or more inputs");
        }
        if args.iter().any(|t| !t.batched) {
            return ctx.e("concat inputs must all have a batch dimension");
        }
        let d0 = &args[0].dims;
        let a = axis(ctx.req("axis")?, d0.len() + 1, &ctx.what("axis"))?;
        if a == 0 {
            return ctx.e("cannot concatenate along the batch axis");
        }
        let mut od = d0.clone();
        od[a - 1] = 0;
        let mut parts = Vec::new();
        let inner: usize = d0[a..].iter().product();
        for t in args {
            let d = &t.dims;
            if d.len() != d0.len()
                || d.iter()
                    .zip(d0)
                    .enumerate()
                    .any(|(i, (x, y))| i != a - 1 && x != y)
            {
                return ctx.e(format!(
                    "cannot concatenate shapes {d0:?} and {d:?} along axis {a}"
                ));
            }
            od[a - 1] = od[a - 1]
                .checked_add(d[a - 1])
                .ok_or_else(|| Error("concat too large".into()))?;
            parts.push(d[a - 1] * inner);
        }
        let outer = d0[..a - 1].iter().product();
        Ok((Op::Concat { outer, parts }, (od, true, None)))
    }
}

impl Builder<'_> {
    /// `slice`: per non-batch axis a start, a step (non-zero, may be negative) and a
    /// size; every index taken must lie inside the axis.
    pub(super) fn slice(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        if d.is_empty() {
            return ctx.e("slice needs an input with a non-batch axis");
        }
        let starts = list_n(ctx.req("starts")?, d.len(), &ctx.what("starts"))?;
        let sizes = list_n(ctx.req("sizes")?, d.len(), &ctx.what("sizes"))?;
        let steps = match ctx.attr("steps") {
            Some(v) => Some(list_n(v, d.len(), &ctx.what("steps"))?),
            None => None,
        };
        let (mut b, mut st, mut sz) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..d.len() {
            let start = uint(&starts[i], &ctx.what("starts"))?;
            let size = pos(&sizes[i], &ctx.what("sizes"))?;
            let step = match steps {
                Some(s) => int(&s[i], &ctx.what("steps"))?,
                None => 1,
            };
            // |step|, start, size ≤ 2^24: the last index fits in i64.
            let last = start as i64 + (size as i64 - 1) * step;
            if step == 0 || start >= d[i] || last < 0 || last >= d[i] as i64 {
                return ctx.e(format!(
                    "slice start {start}, step {step}, size {size} leaves axis {} of length {}",
                    i + 1,
                    d[i]
                ));
            }
            b.push(start);
            st.push(step as isize);
            sz.push(size);
        }
        Ok((Op::Slice(Slice::new(d, &b, &st, &sz)), batched(sz)))
    }
}
