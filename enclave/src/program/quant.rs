//! Dense and conv nodes whose kernel is stored quantised (`kernel_layout`
//! `panels32x2`: bf16, `panels32x4`: int8 with per-column float32 `kernel_scale`;
//! docs/enclave-program.md). The packed kernel is `[ceil(out/32), ceil(in/G), 32, G]`;
//! `kernel_shape` gives the kernel's own shape, which the packing hides.

use safetensors::Dtype;

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{checked_product, list, pos};
use super::{Error, Op, QWeight, TensorMeta};
use crate::ops::dense::NR;

impl Builder<'_> {
    /// The quantised kernel of `ctx` for `layout` and its `kernel_shape` attribute.
    fn qkernel(&mut self, ctx: &NodeCtx, layout: &str) -> Result<(QWeight, Vec<usize>), Error> {
        let (dtype, group) = match layout {
            "panels32x2" => (Dtype::BF16, 2),
            _ => (Dtype::I8, 4),
        };
        let ks: Vec<usize> = list(ctx.req("kernel_shape")?, &ctx.what("kernel_shape"))?
            .iter()
            .map(|v| pos(v, &ctx.what("kernel_shape")))
            .collect::<Result<_, _>>()?;
        if ks.len() < 2 {
            return ctx.e("kernel_shape must have at least 2 dimensions");
        }
        let n = ks[ks.len() - 1];
        let k = checked_product(&ks[..ks.len() - 1], &ctx.what("kernel_shape"))?;
        let Some(key) = ctx.weight_key("kernel")? else {
            return ctx.e("missing weight \"kernel\"");
        };
        let (data, shape) = self.weight_of(key, ctx, dtype)?;
        let want = [n.div_ceil(NR), k.div_ceil(group), NR, group];
        if shape != want {
            return ctx.e(format!(
                "kernel has shape {shape:?}, expected {want:?} for {layout} with kernel_shape {ks:?}"
            ));
        }
        let q = if dtype == Dtype::BF16 {
            QWeight::Bf16(data)
        } else {
            let Some(skey) = ctx.weight_key("kernel_scale")? else {
                return ctx.e("missing weight \"kernel_scale\" (an int8 kernel needs it)");
            };
            let (scale, sshape) = self.weight(skey, ctx)?;
            if sshape != [n] {
                return ctx.e(format!("kernel_scale has shape {sshape:?}, expected [{n}]"));
            }
            // The AVX2 kernel moves activation signs onto the weights (`vpsignb`),
            // which leaves −128 as it is; `split` writes −127 … 127.
            if self.weight_bytes(key).is_some_and(|b| b.contains(&0x80)) {
                return ctx.e("int8 kernel holds -128; quantised kernels must lie in -127..127");
            }
            QWeight::Int8 { data, scale }
        };
        Ok((q, ks))
    }

    /// `dense` with a quantised kernel.
    pub(super) fn qdense(&mut self, ctx: &NodeCtx, x: &TensorMeta, layout: &str) -> NodeResult {
        let d = &x.dims;
        let Some(&k) = d.last() else {
            return ctx.e("dense needs an input of rank >= 2");
        };
        let (kernel, ks) = self.qkernel(ctx, layout)?;
        if ks.len() != 2 || ks[0] != k {
            return ctx.e(format!(
                "kernel_shape {ks:?} does not fit an input of width {k}"
            ));
        }
        let n = ks[1];
        let bias = self.weight_shaped(ctx, "bias", &[n], false)?;
        let mut od = d.clone();
        let rows = d[..d.len() - 1].iter().product();
        if let Some(l) = od.last_mut() {
            *l = n;
        }
        checked_product(&od, &format!("node {:?}: output", ctx.name))?;
        let act = self.activation(ctx, ctx.attr("activation"), &od)?;
        Ok((
            Op::QDense {
                rows,
                k,
                n,
                kernel,
                bias,
                act,
            },
            batched(od),
        ))
    }

    /// `conv` (one group) with a quantised kernel.
    pub(super) fn qconv(&mut self, ctx: &NodeCtx, x: &TensorMeta, layout: &str) -> NodeResult {
        let d: &[usize] = &x.dims;
        let (kernel, ks) = self.qkernel(ctx, layout)?;
        let groups = match ctx.attr("groups") {
            Some(v) => pos(v, &ctx.what("groups"))?,
            None => 1,
        };
        if groups != 1 {
            return ctx.e("a quantised conv kernel needs groups = 1");
        }
        let cin = d[d.len() - 1];
        if d.len() < 2 || d.len() > 3 || ks.len() != d.len() + 1 || ks[ks.len() - 2] != cin {
            return ctx.e(format!(
                "kernel_shape {ks:?} does not fit input [N, {d:?}] (want [k..., Cin, Cout])"
            ));
        }
        let (p, bias, od) = self.conv_params(ctx, d, &ks, groups)?;
        Ok((Op::QConv { p, kernel, bias }, (od, true, None)))
    }
}
