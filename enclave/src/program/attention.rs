//! Attention building blocks: `matmul` of two computed tensors and `softmax` with an
//! optional additive mask, and `gather` (embedding lookup).

use serde_json::Value;

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::boolean;
use super::{Op, TensorMeta};
use crate::ops::binary::BinKind;
use crate::ops::matmul::{Gather, Matmul};

impl Builder<'_> {
    /// `matmul`: `[N, ..., M, K] × [N, ..., K, P] → [N, ..., M, P]`, `transpose_a` /
    /// `transpose_b` meaning the operand is stored with its last two axes swapped.
    pub(super) fn matmul(&mut self, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        let [a, b] = args else {
            return ctx.e(format!("matmul takes exactly 2 inputs, not {}", args.len()));
        };
        if !a.batched || !b.batched {
            return ctx.e(
                "matmul multiplies two computed tensors with a batch dimension (a constant \
                 right operand is a dense node)",
            );
        }
        let flag = |k: &str| -> Result<bool, super::Error> {
            match ctx.attr(k) {
                None | Some(Value::Null) => Ok(false),
                Some(v) => boolean(v, &ctx.what(k)),
            }
        };
        let (ta, tb) = (flag("transpose_a")?, flag("transpose_b")?);
        let (ad, bd) = (&a.dims, &b.dims);
        if ad.len() < 2 || ad.len() != bd.len() {
            return ctx.e(format!(
                "matmul operands must have the same rank, at least 3 with the batch axis \
                 (got [N, {ad:?}] and [N, {bd:?}])"
            ));
        }
        let r = ad.len();
        if ad[..r - 2] != bd[..r - 2] {
            return ctx.e(format!(
                "matmul operands [N, {ad:?}] and [N, {bd:?}] differ in their leading axes \
                 (no broadcasting)"
            ));
        }
        let (m, ka) = if ta {
            (ad[r - 1], ad[r - 2])
        } else {
            (ad[r - 2], ad[r - 1])
        };
        let (kb, p) = if tb {
            (bd[r - 1], bd[r - 2])
        } else {
            (bd[r - 2], bd[r - 1])
        };
        if ka != kb {
            return ctx.e(format!(
                "matmul inner dimensions differ: [N, {ad:?}]{} × [N, {bd:?}]{} ({ka} vs {kb})",
                if ta { "ᵀ" } else { "" },
                if tb { "ᵀ" } else { "" }
            ));
        }
        let slices = ad[..r - 2].iter().product();
        let mut od = ad[..r - 2].to_vec();
        od.extend([m, p]);
        Ok((
            Op::Matmul(Matmul {
                slices,
                m,
                k: ka,
                p,
                trans_a: ta,
                trans_b: tb,
            }),
            batched(od),
        ))
    }

    /// `softmax`: softmax(x + mask) along `axis`; the mask (optional, computed or
    /// constant) broadcasts against x and must not change its shape.
    pub(super) fn softmax(&mut self, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        let (x, mask) = match args {
            [x] => (*x, None),
            [x, m] => (*x, Some(*m)),
            _ => {
                return ctx.e(format!(
                    "softmax takes 1 or 2 inputs (x, mask), not {}",
                    args.len()
                ))
            }
        };
        if !x.batched {
            return ctx.e("softmax needs an input with a batch dimension");
        }
        let mut act = serde_json::Map::new();
        act.insert("fn".into(), Value::from("softmax"));
        if let Some(v) = ctx.attr("axis") {
            act.insert("axis".into(), v.clone());
        }
        let act = self.activation(ctx, Some(&Value::Object(act)), &x.dims)?;
        let mask = match mask {
            None => None,
            Some(m) => {
                let (op, (od, _, _)) = self.binary(BinKind::Add, ctx, &[x, m])?;
                if od != x.dims {
                    return ctx.e(format!(
                        "the mask of shape {:?} broadcasts x of shape [N, {:?}] to [N, {od:?}]; \
                         it may not change x's shape",
                        m.dims, x.dims
                    ));
                }
                let Op::Binary { bcasts, .. } = op else {
                    return ctx.e("internal: mask broadcast");
                };
                Some(bcasts)
            }
        };
        Ok((Op::Softmax { act, mask }, batched(x.dims.clone())))
    }

    /// `gather`: rows of the weight `table` `[V, D...]` picked by integer-valued ids
    /// `[N, ...]` → `[N, ..., D...]`; ids are checked at run time.
    pub(super) fn gather(&mut self, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        let [ids] = args else {
            return ctx.e(format!(
                "gather takes exactly 1 input (the ids), not {}",
                args.len()
            ));
        };
        if !ids.batched {
            return ctx.e("gather needs ids with a batch dimension");
        }
        let Some(key) = ctx.weight_key("table")? else {
            return ctx.e("missing weight \"table\"");
        };
        let (table, shape) = self.weight(key, ctx)?;
        if shape.is_empty() {
            return ctx.e("the table must have at least one dimension (its rows)");
        }
        let rows = shape[0];
        let row_len = shape[1..].iter().product();
        let mut od = ids.dims.clone();
        od.extend_from_slice(&shape[1..]);
        Ok((
            Op::Gather(Gather {
                ids: ids.sample_len(),
                rows,
                row_len,
                table,
            }),
            batched(od),
        ))
    }
}
