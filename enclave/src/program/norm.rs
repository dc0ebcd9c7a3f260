//! Normalisation nodes: per-channel scale and shift (folded batch norm), layer norm.

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{axis, float, list};
use super::{Op, TensorMeta};

impl Builder<'_> {
    /// `scale_shift`: `x * scale + shift` per channel along one axis.
    pub(super) fn scale_shift(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let rank = d.len() + 1;
        let a = match ctx.attr("axis") {
            Some(v) => axis(v, rank, &ctx.what("axis"))?,
            None => rank - 1,
        };
        if a == 0 {
            return ctx.e("scale_shift cannot apply along the batch axis");
        }
        let c = d[a - 1];
        let inner = d[a..].iter().product();
        let scale = self.weight_shaped(ctx, "scale", &[c], true)?;
        let shift = self.weight_shaped(ctx, "shift", &[c], true)?;
        let (Some(scale), Some(shift)) = (scale, shift) else {
            return ctx.e("missing weights");
        };
        Ok((
            Op::ScaleShift {
                c,
                inner,
                scale,
                shift,
            },
            batched(d.clone()),
        ))
    }

    /// `layer_norm`: over trailing non-batch axes, with optional gamma and beta.
    pub(super) fn layer_norm(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let rank = d.len() + 1;
        let axes = list(ctx.req("axes")?, &ctx.what("axes"))?;
        let mut ax = Vec::new();
        for v in axes {
            ax.push(axis(v, rank, &ctx.what("axes"))?);
        }
        ax.sort_unstable();
        ax.dedup();
        let first = rank - ax.len();
        if ax.is_empty() || ax.len() != axes.len() || ax[0] != first || first == 0 {
            return ctx.e("layer_norm axes must be distinct trailing non-batch axes");
        }
        let nd = &d[first - 1..];
        let inner = nd.iter().product();
        let eps = float(ctx.req("epsilon")?, &ctx.what("epsilon"))?;
        let gamma = self.weight_shaped(ctx, "gamma", nd, false)?;
        let beta = self.weight_shaped(ctx, "beta", nd, false)?;
        Ok((
            Op::LayerNorm {
                inner,
                eps,
                gamma,
                beta,
            },
            batched(d.clone()),
        ))
    }
}
