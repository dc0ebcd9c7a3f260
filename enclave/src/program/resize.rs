//! `resize` nodes: nearest or linear, 1-D or 2-D, with the coordinate mapping given.

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{checked_product, float, list_n, pos, string};
use super::{Op, TensorMeta};
use crate::ops::resize::{taps, Coord, Resize, Rounding};

impl Builder<'_> {
    /// `resize`: `sizes` (output spatial dims), `mode`, optional `scales`,
    /// `coordinate_transformation_mode` and `nearest_mode`.
    pub(super) fn resize(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let ns = match d.len() {
            2 => 1,
            3 => 2,
            _ => {
                return ctx.e(format!(
                    "expects a 1-D [N, W, C] or 2-D [N, H, W, C] input, got [N, {d:?}]"
                ))
            }
        };
        let sizes: Vec<usize> = list_n(ctx.req("sizes")?, ns, &ctx.what("sizes"))?
            .iter()
            .map(|v| pos(v, &ctx.what("sizes")))
            .collect::<Result<_, _>>()?;
        let scales: Vec<f64> = match ctx.attr("scales") {
            Some(v) => {
                let mut s = Vec::new();
                for v in list_n(v, ns, &ctx.what("scales"))? {
                    let f = float(v, &ctx.what("scales"))? as f64;
                    if !(f.is_finite() && f > 0.0) {
                        return ctx.e("scales must be positive and finite");
                    }
                    s.push(f);
                }
                s
            }
            None => (0..ns).map(|i| sizes[i] as f64 / d[i] as f64).collect(),
        };
        let linear = match string(ctx.req("mode")?, &ctx.what("mode"))? {
            "nearest" => false,
            "linear" => true,
            m => return ctx.e(format!("unknown resize mode {m:?} (nearest or linear)")),
        };
        let coord = match ctx.attr("coordinate_transformation_mode") {
            None => Coord::HalfPixel,
            Some(v) => {
                let s = string(v, &ctx.what("coordinate_transformation_mode"))?;
                match Coord::parse(s) {
                    Some(c) => c,
                    None => return ctx.e(format!("unknown coordinate_transformation_mode {s:?}")),
                }
            }
        };
        let rounding = match ctx.attr("nearest_mode") {
            None => Rounding::RoundPreferFloor,
            Some(v) => {
                let s = string(v, &ctx.what("nearest_mode"))?;
                match Rounding::parse(s) {
                    Some(r) => r,
                    None => return ctx.e(format!("unknown nearest_mode {s:?}")),
                }
            }
        };
        let c = d[ns];
        let mut od = sizes.clone();
        od.push(c);
        checked_product(&od, &format!("node {:?}: output", ctx.name))?;
        let nearest = (!linear).then_some(rounding);
        let axis = |i: usize| taps(d[i], sizes[i], scales[i], coord, nearest);
        let (h, rows) = if ns == 1 {
            (1, taps(1, 1, 1.0, Coord::Asymmetric, Some(Rounding::Floor)))
        } else {
            (d[0], axis(0))
        };
        let cols = axis(ns - 1);
        Ok((
            Op::Resize(Resize {
                h,
                w: d[ns - 1],
                c,
                rows,
                cols,
                linear,
            }),
            batched(od),
        ))
    }
}
