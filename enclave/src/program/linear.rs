//! Dense and convolution nodes, and the window geometry convolution and pooling share.

use serde_json::Value;

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{checked_product, list_n, pos, string, uint};
use super::{Error, Op, TensorMeta, WRef};
use crate::ops::conv::{ConvParams, Geom};
use crate::ops::conv_transpose::ConvTParams;
use crate::ops::dense;

impl Builder<'_> {
    /// `dense`: a kernel over the last axis (rows or 32-column panels), optional bias and fused activation.
    pub(super) fn dense(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let Some(&k) = d.last() else {
            return ctx.e("dense needs an input of rank >= 2");
        };
        if let Some(l) = quant_layout(ctx)? {
            return self.qdense(ctx, x, l);
        }
        let Some(key) = ctx.weight_key("kernel")? else {
            return ctx.e("missing weight \"kernel\"");
        };
        let (kernel, kshape) = self.weight(key, ctx)?;
        let panels = match ctx.attr("kernel_layout") {
            None => false,
            Some(v) => match string(v, &ctx.what("kernel_layout"))? {
                "rows" => false,
                "panels32" => true,
                l => return ctx.e(format!("unknown kernel_layout {l:?}")),
            },
        };
        let n = if panels {
            // [ceil(units / 32), in, 32]: see dense::pack_panels.
            let n = uint(ctx.req("units")?, &ctx.what("units"))?;
            let want = [n.div_ceil(dense::NR), k, dense::NR];
            if n == 0 || kshape != want {
                return ctx.e(format!(
                    "kernel has shape {kshape:?}, expected {want:?} for panels32 with units {n}"
                ));
            }
            n
        } else {
            if kshape.len() != 2 || kshape[0] != k {
                return ctx.e(format!("kernel has shape {kshape:?}, expected [{k}, out]"));
            }
            kshape[1]
        };
        let bias = self.weight_shaped(ctx, "bias", &[n], false)?;
        let mut od = d.clone();
        let rows = d[..d.len() - 1].iter().product();
        if let Some(l) = od.last_mut() {
            *l = n;
        }
        checked_product(&od, &format!("node {:?}: output", ctx.name))?;
        let act = self.activation(ctx, ctx.attr("activation"), &od)?;
        Ok((
            Op::Dense {
                rows,
                k,
                n,
                kernel,
                panels,
                bias,
                act,
            },
            batched(od),
        ))
    }

    /// `conv`: 1-D or 2-D, grouped, with optional bias and fused activation.
    pub(super) fn conv(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d: &[usize] = &x.dims;
        if let Some(l) = quant_layout(ctx)? {
            return self.qconv(ctx, x, l);
        }
        let Some(key) = ctx.weight_key("kernel")? else {
            return ctx.e("missing weight \"kernel\"");
        };
        let (kernel, ks) = self.weight(key, ctx)?;
        if d.len() < 2 || d.len() > 3 || ks.len() != d.len() + 1 {
            return ctx.e(format!(
                "kernel shape {ks:?} does not fit input [N, {d:?}] (want [k..., Cin/groups, Cout])"
            ));
        }
        let groups = match ctx.attr("groups") {
            Some(v) => pos(v, &ctx.what("groups"))?,
            None => 1,
        };
        let cin = d[d.len() - 1];
        let cout = ks[ks.len() - 1];
        if !cin.is_multiple_of(groups)
            || !cout.is_multiple_of(groups)
            || ks[ks.len() - 2] != cin / groups
        {
            return ctx.e(format!(
                "kernel shape {ks:?} does not fit {cin} input channels in {groups} groups"
            ));
        }
        let (p, bias, od) = self.conv_params(ctx, d, &ks, groups)?;
        Ok((Op::Conv { p, kernel, bias }, (od, true, None)))
    }

    /// A conv's window, bias, output dims and fused activation, once its kernel shape
    /// `ks` ([k..., Cin/groups, Cout]) has been checked against the input `d` (shared by
    /// the fp32 and the quantised conv).
    pub(super) fn conv_params(
        &mut self,
        ctx: &NodeCtx,
        d: &[usize],
        ks: &[usize],
        groups: usize,
    ) -> Result<(ConvParams, Option<WRef>, Vec<usize>), Error> {
        let cout = ks[ks.len() - 1];
        let (g, _) = self.window(ctx, d, Some(&ks[..ks.len() - 2]))?;
        let bias = self.weight_shaped(ctx, "bias", &[cout], false)?;
        let od = spatial_out(d, &g, cout);
        checked_product(&od, &format!("node {:?}: output", ctx.name))?;
        let act = self.activation(ctx, ctx.attr("activation"), &od)?;
        let p = ConvParams {
            g,
            cout,
            groups,
            act,
            pool: None,
        };
        Ok((p, bias, od))
    }

    /// Parse window geometry (conv when `kernel_win` is given, pool otherwise).
    pub(super) fn window(
        &self,
        ctx: &NodeCtx,
        d: &[usize],
        kernel_win: Option<&[usize]>,
    ) -> Result<(Geom, usize), Error> {
        let ns = match d.len() {
            2 => 1,
            3 => 2,
            _ => {
                return ctx.e(format!(
                    "expects a 1-D [N, W, C] or 2-D [N, H, W, C] input, got [N, {d:?}]"
                ))
            }
        };
        let win: Vec<usize> = match kernel_win {
            Some(w) => w.to_vec(),
            None => positives(ctx.req("window")?, ns, &ctx.what("window"))?,
        };
        let strides = positives(ctx.req("strides")?, ns, &ctx.what("strides"))?;
        let dil: Vec<usize> = match (kernel_win, ctx.attr("dilations")) {
            (Some(_), Some(v)) => positives(v, ns, &ctx.what("dilations"))?,
            _ => vec![1; ns],
        };
        let mut pads = Vec::new();
        for p in list_n(ctx.req("pads")?, ns, &ctx.what("pads"))? {
            let p = list_n(p, 2, &ctx.what("pads"))?;
            pads.push((
                uint(&p[0], &ctx.what("pads"))?,
                uint(&p[1], &ctx.what("pads"))?,
            ));
        }
        let mut outs = Vec::new();
        for i in 0..ns {
            let eff = dil[i] * (win[i] - 1) + 1; // ≤ 2^48, no overflow
            let padded = d[i] + pads[i].0 + pads[i].1;
            if padded < eff {
                return ctx.e(format!(
                    "window {} (dilated {eff}) is larger than the padded input {padded}",
                    win[i]
                ));
            }
            outs.push((padded - eff) / strides[i] + 1);
        }
        Ok((geom(d, &win, &strides, &dil, &pads, &outs), ns))
    }
}

/// `panels32x2` / `panels32x4` when the node's kernel is stored quantised.
fn quant_layout<'a>(ctx: &NodeCtx<'a>) -> Result<Option<&'a str>, Error> {
    match ctx.attr("kernel_layout") {
        Some(v) => match string(v, &ctx.what("kernel_layout"))? {
            l @ ("panels32x2" | "panels32x4") => Ok(Some(l)),
            _ => Ok(None),
        },
        None => Ok(None),
    }
}

/// Per-sample output dims of a window op over `d` with `c` output channels.
pub(super) fn spatial_out(d: &[usize], g: &Geom, c: usize) -> Vec<usize> {
    if d.len() == 2 {
        vec![g.ow, c]
    } else {
        vec![g.oh, g.ow, c]
    }
}

/// The kernel geometry of a window over a batched input of per-sample dims `d` (1-D
/// `[W, C]` or 2-D `[H, W, C]`); every other argument has one entry per spatial axis.
fn geom(
    d: &[usize],
    win: &[usize],
    strides: &[usize],
    dil: &[usize],
    pads: &[(usize, usize)],
    outs: &[usize],
) -> Geom {
    let c = d[d.len() - 1];
    if outs.len() == 1 {
        Geom {
            h: 1,
            w: d[0],
            c,
            oh: 1,
            ow: outs[0],
            kh: 1,
            kw: win[0],
            sh: 1,
            sw: strides[0],
            dh: 1,
            dw: dil[0],
            pt: 0,
            pl: pads[0].0,
        }
    } else {
        Geom {
            h: d[0],
            w: d[1],
            c,
            oh: outs[0],
            ow: outs[1],
            kh: win[0],
            kw: win[1],
            sh: strides[0],
            sw: strides[1],
            dh: dil[0],
            dw: dil[1],
            pt: pads[0].0,
            pl: pads[1].0,
        }
    }
}

/// A list of `n` positive integers.
fn positives(v: &Value, n: usize, what: &str) -> Result<Vec<usize>, Error> {
    list_n(v, n, what)?.iter().map(|v| pos(v, what)).collect()
}

impl Builder<'_> {
    /// `conv_transpose`: 1-D or 2-D, grouped, kernel `[Cin, k..., Cout/groups]`,
    /// with optional bias and fused activation.
    pub(super) fn conv_transpose(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d: &[usize] = &x.dims;
        let ns = match d.len() {
            2 => 1,
            3 => 2,
            _ => {
                return ctx.e(format!(
                    "expects a 1-D [N, W, C] or 2-D [N, H, W, C] input, got [N, {d:?}]"
                ))
            }
        };
        let Some(key) = ctx.weight_key("kernel")? else {
            return ctx.e("missing weight \"kernel\"");
        };
        let (kernel, ks) = self.weight(key, ctx)?;
        let cin = d[ns];
        if ks.len() != ns + 2 || ks[0] != cin {
            return ctx.e(format!(
                "kernel shape {ks:?} does not fit input [N, {d:?}] (want [Cin, k..., Cout/groups])"
            ));
        }
        let groups = match ctx.attr("groups") {
            Some(v) => pos(v, &ctx.what("groups"))?,
            None => 1,
        };
        if !cin.is_multiple_of(groups) {
            return ctx.e(format!(
                "{cin} input channels do not split into {groups} groups"
            ));
        }
        let cout = ks[ns + 1]
            .checked_mul(groups)
            .ok_or_else(|| Error(format!("node {:?}: too many output channels", ctx.name)))?;
        let win = &ks[1..=ns];
        let strides = positives(ctx.req("strides")?, ns, &ctx.what("strides"))?;
        let dil = match ctx.attr("dilations") {
            Some(v) => positives(v, ns, &ctx.what("dilations"))?,
            None => vec![1; ns],
        };
        let extra: Vec<usize> = match ctx.attr("output_padding") {
            Some(v) => list_n(v, ns, &ctx.what("output_padding"))?
                .iter()
                .map(|v| uint(v, &ctx.what("output_padding")))
                .collect::<Result<_, _>>()?,
            None => vec![0; ns],
        };
        let mut pads = Vec::new();
        let mut outs = Vec::new();
        for (i, p) in list_n(ctx.req("pads")?, ns, &ctx.what("pads"))?
            .iter()
            .enumerate()
        {
            let p = list_n(p, 2, &ctx.what("pads"))?;
            let (b, e) = (
                uint(&p[0], &ctx.what("pads"))?,
                uint(&p[1], &ctx.what("pads"))?,
            );
            // Every factor is ≤ 2^24: no overflow in 64 bits.
            let full = (d[i] - 1) * strides[i] + dil[i] * (win[i] - 1) + 1 + extra[i];
            if b + e >= full {
                return ctx.e(format!(
                    "pads [{b}, {e}] crop all {full} positions of spatial axis {i}"
                ));
            }
            pads.push((b, e));
            outs.push(full - b - e);
        }
        let g = geom(d, win, &strides, &dil, &pads, &outs);
        let bias = self.weight_shaped(ctx, "bias", &[cout], false)?;
        let od = spatial_out(d, &g, cout);
        checked_product(&od, &format!("node {:?}: output", ctx.name))?;
        let act = self.activation(ctx, ctx.attr("activation"), &od)?;
        Ok((
            Op::ConvTranspose {
                p: ConvTParams {
                    g,
                    cout,
                    groups,
                    act,
                },
                kernel,
                bias,
            },
            (od, true, None),
        ))
    }
}
