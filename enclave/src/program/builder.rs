//! Walking the program graph: the header, each node's JSON, the tensors' inferred
//! shapes and the weights' places. `Builder::node` dispatches each op to its
//! family (`linear`, `pool`, `elementwise`, `norm`, `shape`).

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use super::json::{checked_product, list, obj, pos, string};
use super::{
    fail, Built, Error, Node, Op, TensorMeta, WRef, FORMAT, MAX_INPUTS, MAX_NODES, MAX_RANK,
    VERSION, WALIGN,
};
use crate::ops::binary::BinKind;
use crate::secmem::SecretBuf;

/// A node's output: per-sample dims, whether it has a batch dimension, and (for a
/// constant) the weight it aliases.
pub(super) type OutMeta = (Vec<usize>, bool, Option<WRef>);

/// A validated node: its op and its output.
pub(super) type NodeResult = Result<(Op, OutMeta), Error>;

/// A graph input or output declaration: its name and per-sample dims.
type Decl = (String, Vec<usize>);

/// The output of an op on a batched input.
pub(super) fn batched(dims: Vec<usize>) -> OutMeta {
    (dims, true, None)
}

/// A node's view of its JSON.
pub(super) struct NodeCtx<'a> {
    pub(super) name: String,
    attrs: Option<&'a Map<String, Value>>,
    weights: Option<&'a Map<String, Value>>,
}

impl<'a> NodeCtx<'a> {
    pub(super) fn attr(&self, key: &str) -> Option<&'a Value> {
        self.attrs.and_then(|a| a.get(key))
    }
    pub(super) fn req(&self, key: &str) -> Result<&'a Value, Error> {
        self.attr(key)
            .ok_or_else(|| Error(format!("node {:?}: missing attribute {key:?}", self.name)))
    }
    pub(super) fn what(&self, key: &str) -> String {
        format!("node {:?}: attribute {key:?}", self.name)
    }
    pub(super) fn e<T>(&self, msg: impl std::fmt::Display) -> Result<T, Error> {
        fail(format!("node {:?}: {msg}", self.name))
    }
    pub(super) fn weight_key(&self, role: &str) -> Result<Option<&'a str>, Error> {
        match self.weights.and_then(|w| w.get(role)) {
            None => Ok(None),
            Some(v) => Ok(Some(string(
                v,
                &format!("node {:?}: weight {role:?}", self.name),
            )?)),
        }
    }

    /// Node `i`'s name (`#i` if it has none) and its `attrs` and `weights` objects.
    fn parse(i: usize, n: &'a Map<String, Value>) -> Result<NodeCtx<'a>, Error> {
        let name = match n.get("name") {
            Some(v) => string(v, &format!("node #{i}: \"name\""))?.to_string(),
            None => format!("#{i}"),
        };
        Ok(NodeCtx {
            attrs: match n.get("attrs") {
                None | Some(Value::Null) => None,
                Some(v) => Some(obj(v, &format!("node {name:?}: \"attrs\""))?),
            },
            weights: match n.get("weights") {
                None | Some(Value::Null) => None,
                Some(v) => Some(obj(v, &format!("node {name:?}: \"weights\""))?),
            },
            name,
        })
    }
}

/// The graph so far: its tensors (the inputs first), their names, the nodes.
struct Graph {
    tensors: Vec<TensorMeta>,
    by_name: HashMap<String, usize>,
    nodes: Vec<Node>,
}

/// Walks the graph: resolves every node against the shapes inferred so far and
/// places the weights it uses.
pub(super) struct Builder<'d> {
    st: SafeTensors<'d>,
    /// In place: the address of the (page-aligned) buffer holding the container;
    /// a weight's place is then its byte offset in that buffer / 4.
    base: Option<usize>,
    /// safetensors key -> (place, shape)
    weights: HashMap<String, (WRef, Vec<usize>)>,
    /// Copy: floats reserved so far.
    total: usize,
}

impl<'d> Builder<'d> {
    /// `base`: the address of the buffer holding the container, to use the weights
    /// in place; None: copy them.
    pub(super) fn new(st: SafeTensors<'d>, base: Option<usize>) -> Builder<'d> {
        Builder {
            st,
            base,
            weights: HashMap::new(),
            total: 0,
        }
    }

    /// Look up (and reserve space for) a float32 weight; returns its place and shape.
    pub(super) fn weight(&mut self, key: &str, ctx: &NodeCtx) -> Result<(WRef, Vec<usize>), Error> {
        self.weight_of(key, ctx, Dtype::F32)
    }

    /// The raw bytes of weight `key` (validated by [`Self::weight_of`] first).
    pub(super) fn weight_bytes(&self, key: &str) -> Option<&[u8]> {
        self.st.tensor(key).ok().map(|v| v.data())
    }

    /// [`Self::weight`] for a weight of type `dtype` (F32, or BF16 / I8 for a
    /// quantised kernel, whose `WRef` then counts its bytes / 4: see `quant`).
    pub(super) fn weight_of(
        &mut self,
        key: &str,
        ctx: &NodeCtx,
        dtype: Dtype,
    ) -> Result<(WRef, Vec<usize>), Error> {
        let view = match self.st.tensor(key) {
            Ok(v) => v,
            Err(_) => return ctx.e(format!("weight {key:?} is not in weights.safetensors")),
        };
        if view.dtype() != dtype {
            return ctx.e(format!(
                "weight {key:?} has dtype {:?}, not {dtype:?}",
                view.dtype()
            ));
        }
        if let Some(w) = self.weights.get(key) {
            return Ok(w.clone());
        }
        let shape = view.shape().to_vec();
        if shape.len() > MAX_RANK {
            return ctx.e(format!(
                "weight {key:?} has rank {} (at most {MAX_RANK})",
                shape.len()
            ));
        }
        if shape.contains(&0) {
            return ctx.e(format!("weight {key:?} has an empty dimension {shape:?}"));
        }
        let elems = checked_product(&shape, &format!("node {:?}: weight {key:?}", ctx.name))?;
        let size = dtype.bitsize() / 8;
        // Quantised kernels are whole 128-byte panel rows, so `len` floats hold them.
        if view.data().len() != elems * size || !view.data().len().is_multiple_of(4) {
            return ctx.e(format!("weight {key:?} has the wrong data length"));
        }
        let len = view.data().len() / 4;
        if let Some(base) = self.base {
            let at = view.data().as_ptr() as usize - base;
            let w = (WRef { off: at / 4, len }, shape);
            self.weights.insert(key.to_string(), w.clone());
            return Ok(w);
        }
        let off = self.total;
        let end = off
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(WALIGN))
            .filter(|&e| e <= usize::MAX / 8)
            .ok_or_else(|| Error("weights are too large".into()))?;
        self.total = end;
        let w = (WRef { off, len }, shape);
        self.weights.insert(key.to_string(), w.clone());
        Ok(w)
    }

    /// A weight of a given role, which must have exactly `want` as shape.
    pub(super) fn weight_shaped(
        &mut self,
        ctx: &NodeCtx,
        role: &str,
        want: &[usize],
        required: bool,
    ) -> Result<Option<WRef>, Error> {
        let Some(key) = ctx.weight_key(role)? else {
            if required {
                return ctx.e(format!("missing weight {role:?}"));
            }
            return Ok(None);
        };
        let (w, shape) = self.weight(key, ctx)?;
        if shape != want {
            return ctx.e(format!(
                "weight {role:?} ({key:?}) has shape {shape:?}, expected {want:?}"
            ));
        }
        Ok(Some(w))
    }

    /// Validate the graph `g`; in copy mode also returns the used weights, copied.
    pub(super) fn build(mut self, g: &Value) -> Result<(Built, Option<SecretBuf<f32>>), Error> {
        let g = obj(g, "program.json")?;
        let (nodes, ins, (out_name, out_dims)) = header(g)?;
        let mut graph = Graph {
            tensors: Vec::with_capacity(ins.len() + nodes.len()),
            by_name: HashMap::new(),
            nodes: Vec::with_capacity(nodes.len()),
        };
        for (in_name, in_dims) in ins {
            if graph.by_name.contains_key(&in_name) {
                return fail(format!("graph input {in_name:?} is declared twice"));
            }
            graph.by_name.insert(in_name.clone(), graph.tensors.len());
            graph.tensors.push(TensorMeta {
                name: in_name,
                dims: in_dims,
                batched: true,
                constant: None,
            });
        }
        let num_inputs = graph.tensors.len();
        for (i, nv) in nodes.iter().enumerate() {
            self.add_node(&mut graph, i, nv)?;
        }
        let output = graph_output(&graph, &out_name, &out_dims)?;
        let built = Built {
            tensors: graph.tensors,
            nodes: graph.nodes,
            num_inputs,
            output,
        };
        if self.base.is_some() {
            return Ok((built, None));
        }
        let buf = self.copy_weights()?;
        Ok((built, Some(buf)))
    }

    /// Validate node `i` (JSON `nv`) against the graph so far and add it.
    fn add_node(&mut self, graph: &mut Graph, i: usize, nv: &Value) -> Result<(), Error> {
        let n = obj(nv, &format!("node #{i}"))?;
        let ctx = NodeCtx::parse(i, n)?;
        let op = string(
            n.get("op").unwrap_or(&Value::Null),
            &format!("node {:?}: \"op\"", ctx.name),
        )?;
        let ins = list(
            n.get("inputs").unwrap_or(&Value::Null),
            &format!("node {:?}: \"inputs\"", ctx.name),
        )?;
        let outs = list(
            n.get("outputs").unwrap_or(&Value::Null),
            &format!("node {:?}: \"outputs\"", ctx.name),
        )?;
        let mut in_ids = Vec::with_capacity(ins.len());
        for v in ins {
            let t = string(v, &format!("node {:?}: input name", ctx.name))?;
            match graph.by_name.get(t) {
                Some(&id) => in_ids.push(id),
                None => {
                    return ctx.e(format!(
                        "input {t:?} is not defined by an earlier node or a graph input"
                    ))
                }
            }
        }
        if outs.len() != 1 {
            return ctx.e(format!("must have exactly one output, not {}", outs.len()));
        }
        let out_t = string(&outs[0], &format!("node {:?}: output name", ctx.name))?;
        if graph.by_name.contains_key(out_t) {
            return ctx.e(format!("output {out_t:?} is already defined"));
        }
        let args: Vec<&TensorMeta> = in_ids.iter().map(|&id| &graph.tensors[id]).collect();
        let (op, meta) = self.node(op, &ctx, &args)?;
        checked_product(&meta.0, &format!("node {:?}: output", ctx.name))?;
        if meta.0.len() + usize::from(meta.1) > MAX_RANK {
            return ctx.e(format!("output rank is above {MAX_RANK}"));
        }
        let id = graph.tensors.len();
        graph.tensors.push(TensorMeta {
            name: out_t.to_string(),
            dims: meta.0,
            batched: meta.1,
            constant: meta.2,
        });
        graph.by_name.insert(out_t.to_string(), id);
        graph.nodes.push(Node {
            name: ctx.name,
            op,
            inputs: in_ids,
            output: id,
        });
        Ok(())
    }

    /// Copy the used weights into one secret buffer.
    fn copy_weights(&self) -> Result<SecretBuf<f32>, Error> {
        let mut buf = SecretBuf::<f32>::new(self.total).map_err(|e| {
            Error(format!(
                "cannot allocate {} floats of secret memory for the weights ({e})",
                self.total
            ))
        })?;
        for (key, (w, _)) in &self.weights {
            let view = self
                .st
                .tensor(key)
                .map_err(|e| Error(format!("weight {key:?}: {e}")))?;
            let dst = buf
                .get_mut(w.off..w.off + w.len)
                .ok_or_else(|| Error("internal: weight placement".into()))?;
            for (d, s) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        Ok(buf)
    }

    /// Validate one node; returns its op and (output dims, batched, constant).
    fn node(&mut self, op: &str, ctx: &NodeCtx, args: &[&TensorMeta]) -> NodeResult {
        if let Some(kind) = BinKind::from_op(op) {
            return self.binary(kind, ctx, args);
        }
        if op == "constant" {
            return self.constant(ctx, args);
        }
        if op == "concat" {
            return self.concat(ctx, args);
        }
        if op == "matmul" {
            return self.matmul(ctx, args);
        }
        if op == "softmax" {
            return self.softmax(ctx, args);
        }
        if op == "gather" {
            return self.gather(ctx, args);
        }
        if op == "where" {
            return self.where_node(ctx, args);
        }
        // The rest take exactly one batched input.
        let unary: fn(&mut Self, &NodeCtx, &TensorMeta) -> NodeResult = match op {
            "dense" => Self::dense,
            "conv" => Self::conv,
            "conv_transpose" => Self::conv_transpose,
            "resize" => Self::resize,
            "slice" => Self::slice,
            "pool" => Self::pool,
            "global_pool" => Self::global_pool,
            "reduce" => Self::reduce,
            "pad" => Self::pad,
            "reshape" => Self::reshape,
            "transpose" => Self::transpose,
            "scale_shift" => Self::scale_shift,
            "layer_norm" => Self::layer_norm,
            "activation" => Self::activation_node,
            "expand" => Self::expand,
            "cast" => Self::cast,
            _ => return ctx.e(format!("unknown op {op:?}")),
        };
        if args.len() != 1 {
            return ctx.e(format!(
                "op {op:?} takes exactly one input, not {}",
                args.len()
            ));
        }
        let x = args[0];
        if !x.batched {
            return ctx.e(format!("op {op:?} needs an input with a batch dimension"));
        }
        unary(self, ctx, x)
    }
}

/// The graph header: format and version, then the node list, the input declarations
/// (one or more, at most [`MAX_INPUTS`]) and the output declaration (exactly one).
fn header(g: &Map<String, Value>) -> Result<(&Vec<Value>, Vec<Decl>, Decl), Error> {
    if g.get("format").and_then(Value::as_str) != Some(FORMAT)
        || g.get("version").and_then(Value::as_u64) != Some(VERSION)
    {
        return fail(format!(
            "not an {FORMAT} version {VERSION} program (format={}, version={})",
            g.get("format").unwrap_or(&Value::Null),
            g.get("version").unwrap_or(&Value::Null)
        ));
    }
    let inputs = list(g.get("inputs").unwrap_or(&Value::Null), "\"inputs\"")?;
    let outputs = list(g.get("outputs").unwrap_or(&Value::Null), "\"outputs\"")?;
    if inputs.is_empty() || inputs.len() > MAX_INPUTS || outputs.len() != 1 {
        return fail(format!(
            "version 1 programs have 1 to {MAX_INPUTS} inputs and exactly one output (got {} and {})",
            inputs.len(),
            outputs.len()
        ));
    }
    let nodes = list(g.get("nodes").unwrap_or(&Value::Null), "\"nodes\"")?;
    if nodes.len() > MAX_NODES {
        return fail(format!("too many nodes ({})", nodes.len()));
    }
    let ins = inputs
        .iter()
        .map(|v| tensor_decl(v, "input"))
        .collect::<Result<Vec<_>, _>>()?;
    let (out_name, out_dims) = tensor_decl(&outputs[0], "output")?;
    Ok((nodes, ins, (out_name, out_dims)))
}

/// The graph output `out_name`, which must be a batched tensor of per-sample dims
/// `out_dims`.
fn graph_output(graph: &Graph, out_name: &str, out_dims: &[usize]) -> Result<usize, Error> {
    let Some(&output) = graph.by_name.get(out_name) else {
        return fail(format!(
            "graph output {out_name:?} is not produced by any node"
        ));
    };
    let ot = &graph.tensors[output];
    if !ot.batched {
        return fail(format!("graph output {out_name:?} has no batch dimension"));
    }
    if ot.dims != out_dims {
        return fail(format!(
                "graph output {out_name:?} is declared with shape [null, {out_dims:?}] but the program computes [null, {:?}]",
                ot.dims
            ));
    }
    Ok(output)
}

/// `{"name": ..., "shape": [null, d...], "dtype": "float32"}` → (name, dims).
fn tensor_decl(v: &Value, what: &str) -> Result<Decl, Error> {
    let o = obj(v, &format!("graph {what}"))?;
    let name = string(
        o.get("name").unwrap_or(&Value::Null),
        &format!("graph {what} name"),
    )?
    .to_string();
    let shape = list(
        o.get("shape").unwrap_or(&Value::Null),
        &format!("graph {what} {name:?} shape"),
    )?;
    if let Some(dt) = o.get("dtype") {
        // Integer inputs (token ids) travel as float32 values, exact below 2^24;
        // `gather` checks each one is an integer inside its table.
        let int_ok = what == "input" && matches!(dt.as_str(), Some("int32" | "int64"));
        if dt.as_str() != Some("float32") && !int_ok {
            return fail(format!(
                "graph {what} {name:?} must have dtype float32{}",
                if what == "input" {
                    " (or int32/int64)"
                } else {
                    ""
                }
            ));
        }
    }
    if shape.is_empty() || !shape[0].is_null() || shape.len() > MAX_RANK {
        return fail(format!("graph {what} {name:?} shape must start with null (the batch dim) and have rank <= {MAX_RANK}"));
    }
    let dims: Vec<usize> = shape[1..]
        .iter()
        .map(|v| pos(v, &format!("graph {what} {name:?} dimension")))
        .collect::<Result<_, _>>()?;
    checked_product(&dims, &format!("graph {what} {name:?}"))?;
    Ok((name, dims))
}
