//! Elementwise nodes: binary ops with broadcasting, activations (as nodes and as
//! the fused activation of dense and conv).

use serde_json::Value;

use super::builder::{batched, Builder, NodeCtx, NodeResult};
use super::json::{axis, boolean, checked_product, float, list, obj, pos, string};
use super::{fail, Error, Op, TensorMeta, MAX_RANK};
use crate::ops::binary::{Bcast, BinKind, Select};
use crate::ops::Act;

impl Builder<'_> {
    /// A binary (or variadic) elementwise op with broadcasting; constant operands
    /// broadcast against every sample.
    pub(super) fn binary(
        &mut self,
        kind: BinKind,
        ctx: &NodeCtx,
        args: &[&TensorMeta],
    ) -> NodeResult {
        if args.len() < 2 || (!kind.variadic() && args.len() != 2) {
            return ctx.e(format!(
                "{kind:?} takes {} inputs, not {}",
                if kind.variadic() {
                    "2 or more"
                } else {
                    "exactly 2"
                },
                args.len()
            ));
        }
        let (aligned, od, batched) = broadcast(ctx, args)?;
        let bcasts = aligned
            .iter()
            .zip(args)
            .map(|(a, t)| Bcast::new(&od, a, t.batched))
            .collect();
        Ok((Op::Binary { kind, bcasts }, (od, batched, None)))
    }

    /// `where`: cond, x, y broadcast together (numpy rules); cond ≠ 0 picks x.
    pub(super) fn where_node(&mut self, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        if args.len() != 3 {
            return ctx.e(format!(
                "where takes exactly 3 inputs (cond, x, y), not {}",
                args.len()
            ));
        }
        let (aligned, od, batched) = broadcast(ctx, args)?;
        let sel = Select::new(
            &od,
            [&aligned[0], &aligned[1], &aligned[2]],
            [args[0].batched, args[1].batched, args[2].batched],
        );
        Ok((Op::Where(sel), (od, batched, None)))
    }

    /// `expand`: x broadcast (numpy rules) to the per-sample dims `shape`.
    pub(super) fn expand(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let shape = list(ctx.req("shape")?, &ctx.what("shape"))?;
        if shape.len() + 1 > MAX_RANK {
            return ctx.e("expand target rank is too large");
        }
        let od: Vec<usize> = shape
            .iter()
            .map(|v| pos(v, &ctx.what("shape")))
            .collect::<Result<_, _>>()?;
        checked_product(&od, &ctx.what("shape"))?;
        let d = &x.dims;
        if d.len() > od.len() {
            return ctx.e(format!(
                "cannot expand [N, {d:?}] to fewer axes [N, {od:?}]"
            ));
        }
        let mut aligned = vec![1; od.len() - d.len()];
        aligned.extend_from_slice(d);
        if aligned.iter().zip(&od).any(|(&a, &o)| a != 1 && a != o) {
            return ctx.e(format!("[N, {d:?}] does not broadcast to [N, {od:?}]"));
        }
        let bc = Bcast::new(&od, &aligned, true);
        Ok((Op::Expand(bc), batched(od)))
    }

    /// `cast`: to `float32` (the identity), `bool` (x ≠ 0 → 1, else 0) or `int32` /
    /// `int64` (truncation toward zero, clamped to the type's range, NaN → 0).
    pub(super) fn cast(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let act = match string(ctx.req("to")?, &ctx.what("to"))? {
            "float32" => Act::Linear,
            "bool" => Act::CastBool,
            "int32" => Act::CastInt {
                min: i32::MIN as f32,
                max: i32::MAX as f32,
            },
            "int64" => Act::CastInt {
                min: i64::MIN as f32,
                max: i64::MAX as f32,
            },
            t => {
                return ctx.e(format!(
                    "cast to {t:?}: only float32, bool, int32 and int64 are supported"
                ))
            }
        };
        Ok((Op::Activation(act), batched(x.dims.clone())))
    }

    /// `activation`: one activation function applied elementwise.
    pub(super) fn activation_node(&mut self, ctx: &NodeCtx, x: &TensorMeta) -> NodeResult {
        let d = &x.dims;
        let act = self.activation(ctx, Some(ctx.req("activation")?), d)?;
        Ok((Op::Activation(act), batched(d.clone())))
    }

    /// Parse an activation object for a batched tensor of per-sample dims `dims`.
    pub(super) fn activation(
        &self,
        ctx: &NodeCtx,
        v: Option<&Value>,
        dims: &[usize],
    ) -> Result<Act, Error> {
        let Some(v) = v else { return Ok(Act::Linear) };
        if v.is_null() {
            return Ok(Act::Linear);
        }
        let what = format!("node {:?}: activation", ctx.name);
        let a = obj(v, &what)?;
        let fname = string(
            a.get("fn").unwrap_or(&Value::Null),
            &format!("{what} \"fn\""),
        )?;
        let p = |k: &str, default: Option<f32>| -> Result<f32, Error> {
            match (a.get(k), default) {
                (Some(v), _) => float(v, &format!("{what} parameter {k:?}")),
                (None, Some(d)) => Ok(d),
                (None, None) => fail(format!("{what} {fname:?} needs parameter {k:?}")),
            }
        };
        Ok(match fname {
            "linear" => Act::Linear,
            "relu" => Act::Relu,
            "relu6" => Act::Relu6,
            "leaky_relu" => Act::LeakyRelu(p("alpha", Some(0.2))?),
            "elu" => Act::Elu(p("alpha", Some(1.0))?),
            "selu" => Act::Selu,
            "gelu" => match a.get("approximate") {
                Some(v) if boolean(v, &format!("{what} \"approximate\""))? => Act::GeluTanh,
                _ => Act::Gelu,
            },
            "sigmoid" => Act::Sigmoid,
            "hard_sigmoid" => Act::HardSigmoid {
                alpha: p("alpha", Some(1.0 / 6.0))?,
                beta: p("beta", Some(0.5))?,
            },
            "hard_swish" => Act::HardSwish,
            "tanh" => Act::Tanh,
            "swish" | "silu" => Act::Swish,
            "softmax" => {
                let rank = dims.len() + 1;
                let ax = match a.get("axis") {
                    Some(v) => axis(v, rank, &format!("{what} \"axis\""))?,
                    None => rank - 1,
                };
                if ax == 0 {
                    return fail(format!(
                        "{what}: softmax over the batch axis is not supported"
                    ));
                }
                Act::Softmax {
                    axis_len: dims[ax - 1],
                    inner: dims[ax..].iter().product(),
                }
            }
            "clip" => Act::Clip {
                min: p("min", None)?,
                max: p("max", None)?,
            },
            "exp" => Act::Exp,
            "log" => Act::Log,
            "sqrt" => Act::Sqrt,
            "abs" => Act::Abs,
            "neg" => Act::Neg,
            "reciprocal" => Act::Reciprocal,
            "erf" => Act::Erf,
            "erfc" => Act::Erfc,
            f => return fail(format!("{what}: unknown activation {f:?}")),
        })
    }
}

/// Each operand's dims aligned to the output's, the output's per-sample dims, and
/// whether the output is batched.
type Broadcast = (Vec<Vec<usize>>, Vec<usize>, bool);

/// Numpy broadcasting of `args` (batched operands share one rank; constants may not
/// broadcast against the batch axis): each operand's dims aligned to the output's,
/// the output's per-sample dims, and whether it is batched.
fn broadcast(ctx: &NodeCtx, args: &[&TensorMeta]) -> Result<Broadcast, Error> {
    let batched = args.iter().any(|t| t.batched);
    // Per-sample rank of the result.
    let rank = if batched {
        let r = args.iter().find(|t| t.batched).map_or(0, |t| t.dims.len());
        for t in args {
            if t.batched && t.dims.len() != r {
                return ctx.e("batched operands must have the same rank");
            }
            if !t.batched && t.dims.len() > r + 1 {
                return ctx.e(format!(
                    "constant operand of shape {:?} has a higher rank than the batched operands",
                    t.dims
                ));
            }
            if !t.batched && t.dims.len() == r + 1 && t.dims[0] != 1 {
                return ctx.e(format!(
                    "constant operand of shape {:?} would broadcast against the batch axis",
                    t.dims
                ));
            }
        }
        r
    } else {
        args.iter().map(|t| t.dims.len()).max().unwrap_or(0)
    };
    // Align every operand's dims to `rank` (left-pad with 1, drop a leading 1).
    let aligned: Vec<Vec<usize>> = args
        .iter()
        .map(|t| {
            let s: &[usize] = if t.dims.len() > rank {
                &t.dims[t.dims.len() - rank..]
            } else {
                &t.dims
            };
            let mut v = vec![1; rank - s.len()];
            v.extend_from_slice(s);
            v
        })
        .collect();
    let mut od = vec![1usize; rank];
    for a in &aligned {
        for (o, &v) in od.iter_mut().zip(a) {
            if *o == 1 {
                *o = v;
            } else if v != 1 && v != *o {
                let shapes: Vec<&Vec<usize>> = args.iter().map(|t| &t.dims).collect();
                return ctx.e(format!("operand shapes {shapes:?} do not broadcast"));
            }
        }
    }
    Ok((aligned, od, batched))
}
