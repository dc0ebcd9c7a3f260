//! Pooling and reduction nodes.

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{axis, boolean, list, string};
use super::linear::spatial_out;
use super::{Node, Op, TensorMeta};
use crate::ops::misc::{Reduce, ReduceKind};

impl Builder<'_> {
    /// `pool`: max or average over a 1-D or 2-D window.
    pub(super) fn pool(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let (g, _) = self.window(ctx, d, None)?;
        let max = match string(ctx.req("kind")?, &ctx.what("kind"))? {
            "max" => true,
            "avg" => false,
            k => return ctx.e(format!("unknown pool kind {k:?}")),
        };
        let cip = match ctx.attr("count_include_pad") {
            Some(v) => boolean(v, &ctx.what("count_include_pad"))?,
            None => false,
        };
        let od = spatial_out(d, &g, g.c);
        Ok((
            Op::Pool {
                g,
                max,
                count_include_pad: cip,
            },
            batched(od),
        ))
    }

    /// `global_pool`: max or average over all spatial positions.
    pub(super) fn global_pool(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        if d.len() < 2 {
            return ctx.e("global_pool needs an input [N, spatial..., C]");
        }
        let max = match string(ctx.req("kind")?, &ctx.what("kind"))? {
            "max" => true,
            "avg" => false,
            k => return ctx.e(format!("unknown global_pool kind {k:?}")),
        };
        let keep = match ctx.attr("keepdims") {
            Some(v) => boolean(v, &ctx.what("keepdims"))?,
            None => false,
        };
        let c = d[d.len() - 1];
        let s = d[..d.len() - 1].iter().product();
        let od = if keep {
            let mut o = vec![1; d.len() - 1];
            o.push(c);
            o
        } else {
            vec![c]
        };
        Ok((Op::GlobalPool { s, c, max }, batched(od)))
    }

    /// `reduce`: mean, sum, max or min over non-batch axes.
    pub(super) fn reduce(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let rank = d.len() + 1;
        let kind = match string(ctx.req("kind")?, &ctx.what("kind"))? {
            "mean" => ReduceKind::Mean,
            "sum" => ReduceKind::Sum,
            "max" => ReduceKind::Max,
            "min" => ReduceKind::Min,
            k => return ctx.e(format!("unknown reduce kind {k:?}")),
        };
        let mut red = vec![false; d.len()];
        for a in list(ctx.req("axes")?, &ctx.what("axes"))? {
            let a = axis(a, rank, &ctx.what("axes"))?;
            if a == 0 {
                return ctx.e("cannot reduce over the batch axis");
            }
            red[a - 1] = true;
        }
        let keep = match ctx.attr("keepdims") {
            Some(v) => boolean(v, &ctx.what("keepdims"))?,
            None => false,
        };
        let od = d
            .iter()
            .zip(&red)
            .filter_map(|(&v, &r)| if r { keep.then_some(1) } else { Some(v) })
            .collect();
        Ok((Op::Reduce(Reduce::new(kind, d, &red)), batched(od)))
    }
}

/// Fuse each max pool into the conv before it ([`ConvParams::pool`]) where the pool
/// alone reads the conv's output, which is not the program's `output`, and the conv can
/// take it ([`ConvParams::can_fuse_pool`]): the conv output then never goes out to
/// memory and back (6.4 MB at batch 64 for the first layer of the image model of
/// `benchmarks/bench_matrix.py`). The executor does this on its own copy of the nodes.
///
/// [`ConvParams::pool`]: crate::ops::conv::ConvParams::pool
/// [`ConvParams::can_fuse_pool`]: crate::ops::conv::ConvParams::can_fuse_pool
pub fn fuse_conv_pools(nodes: &mut Vec<Node>, output: usize) {
    let mut j = 0;
    while j < nodes.len() {
        let fused = match (&nodes[j].op, &nodes[j].inputs[..]) {
            (
                Op::Pool {
                    g: pg, max: true, ..
                },
                &[t],
            ) if t != output => {
                let readers = nodes.iter().filter(|n| n.inputs.contains(&t)).count();
                let conv = nodes[..j].iter().position(|n| n.output == t);
                match conv {
                    Some(i) if readers == 1 => match &nodes[i].op {
                        Op::Conv { p, .. } if p.can_fuse_pool(pg) => Some((i, pg.clone())),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((i, pg)) = fused else {
            j += 1;
            continue;
        };
        let pool = nodes.remove(j);
        if let Op::Conv { p, .. } = &mut nodes[i].op {
            p.pool = Some(pg);
        }
        nodes[i].output = pool.output;
    }
}
