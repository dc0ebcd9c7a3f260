//! Parse and validate an enclave program container (docs/enclave-program.md).
//!
//! Everything is checked here, once: the container framing, the JSON graph, every
//! node's attributes, weight shapes and the inferred shape of every tensor. The
//! result is a list of nodes with fully resolved kernel parameters plus the weights.
//! The weights stay where they are in the decrypted container (a secret-memory
//! buffer the program takes over: no second copy, no extra secret pages) when every
//! float32 tensor is 4-byte aligned there; otherwise the used weights are copied
//! into one buffer of secret memory. Nothing in
//! this module may panic on any input (it is fuzzed); sizes coming from the input
//! are capped and multiplied with overflow checks.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use crate::ops::binary::{Bcast, BinKind};
use crate::ops::conv::{ConvParams, Geom};
use crate::ops::dense;
use crate::ops::misc::{Pad, Reduce, ReduceKind, Transpose};
use crate::ops::Act;
use crate::secmem::{Backing, SecretBuf};

pub const MAGIC: &[u8; 8] = b"ENCPROG1";
pub const FORMAT: &str = "ennclave-program";
pub const VERSION: u64 = 1;

/// Largest tensor rank (batch dim included) we accept.
pub const MAX_RANK: usize = 8;
/// Largest number of elements of one tensor, per sample.
pub const MAX_SAMPLE_ELEMS: usize = 1 << 28;
/// Largest single dimension / window / stride / dilation / padding value.
pub const MAX_DIM: usize = 1 << 24;
pub const MAX_NODES: usize = 100_000;

/// A program or execution error, with a message meant for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn fail<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error(msg.into()))
}

/// A weight tensor's place in the weight buffer ([`Weights::floats`]), in floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WRef {
    pub off: usize,
    pub len: usize,
}

/// A tensor of the graph. `dims` excludes the batch dim; `batched` is false only
/// for constants (and elementwise results of constants only).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub name: String,
    pub dims: Vec<usize>,
    pub batched: bool,
    /// For outputs of `constant` nodes: the weight they alias.
    pub constant: Option<WRef>,
}

impl TensorMeta {
    /// Elements per sample (product of `dims`; 1 for a per-sample scalar).
    pub fn sample_len(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A node's operation with every parameter resolved against the inferred shapes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `rows` = rows per sample (product of the middle dims).
    Dense {
        rows: usize,
        k: usize,
        n: usize,
        kernel: WRef,
        /// The kernel is stored in 32-column panels (`kernel_layout: panels32`).
        panels: bool,
        bias: Option<WRef>,
        act: Act,
    },
    Conv {
        p: ConvParams,
        kernel: WRef,
        bias: Option<WRef>,
    },
    Pool {
        g: Geom,
        max: bool,
        count_include_pad: bool,
    },
    GlobalPool {
        s: usize,
        c: usize,
        max: bool,
    },
    Reduce(Reduce),
    Pad(Pad),
    /// Reshape: a plain copy.
    Copy,
    Transpose(Transpose),
    ScaleShift {
        c: usize,
        inner: usize,
        scale: WRef,
        shift: WRef,
    },
    LayerNorm {
        inner: usize,
        eps: f32,
        gamma: Option<WRef>,
        beta: Option<WRef>,
    },
    Binary {
        kind: BinKind,
        bcasts: Vec<Bcast>,
    },
    Concat {
        outer: usize,
        parts: Vec<usize>,
    },
    /// Output aliases a weight; nothing to run.
    Constant,
    Activation(Act),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// Tensor indices.
    pub inputs: Vec<usize>,
    pub output: usize,
}

/// The weights of a program, in secret memory, zeroed on drop.
pub(crate) enum Weights {
    /// The decrypted container itself: weights are used in place.
    Container(SecretBuf<u8>),
    /// The used weights, copied (some tensor was not 4-byte aligned in place).
    Copied(SecretBuf<f32>),
}

impl Weights {
    /// The buffer as floats ([`WRef`]s index this).
    pub(crate) fn floats(&self) -> &[f32] {
        match self {
            Weights::Container(b) => b.as_f32(),
            Weights::Copied(b) => b,
        }
    }

    fn backing(&self) -> Backing {
        match self {
            Weights::Container(b) => b.backing(),
            Weights::Copied(b) => b.backing(),
        }
    }
}

/// A validated program: nodes in execution order, tensor metadata, weights.
pub struct Program {
    pub tensors: Vec<TensorMeta>,
    pub nodes: Vec<Node>,
    pub input: usize,
    pub output: usize,
    pub(crate) weights: Arc<Weights>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("tensors", &self.tensors.len())
            .field("nodes", &self.nodes.len())
            .field("weights", &self.weights.floats().len())
            .finish()
    }
}

impl Program {
    /// Parse and validate a program container (copied into secret memory first).
    pub fn from_container(data: &[u8]) -> Result<Program, Error> {
        let mut buf = SecretBuf::<u8>::new(data.len() + WALIGN * 4).map_err(|e| {
            Error(format!(
                "cannot allocate {} bytes of secret memory for the program ({e})",
                data.len()
            ))
        })?;
        buf[..data.len()].copy_from_slice(data);
        Self::from_secret(buf, 0..data.len())
    }

    /// Parse and validate the program container at `buf[range]`, taking `buf` over:
    /// the weights are used where they are (unless a tensor is misaligned, then they
    /// are copied and `buf` is dropped, i.e. zeroed). If `buf` has room after the
    /// range (64 bytes), the container is first moved so the tensor data starts
    /// 64-byte aligned.
    pub fn from_secret(mut buf: SecretBuf<u8>, range: Range<usize>) -> Result<Program, Error> {
        let (json, weights) = split_container(&buf[range.clone()])?;
        let data_at = weights_data_offset(weights).map(|d| range.start + 16 + json.len() + d);
        let mut range = range;
        if let Some(at) = data_at {
            let shift = at.next_multiple_of(WALIGN * 4) - at;
            if shift > 0 && range.end + shift <= buf.len() {
                buf.copy_within(range.clone(), range.start + shift);
                range = range.start + shift..range.end + shift;
            }
        }
        let data = &buf[range];
        let (json, weights) = split_container(data)?;
        let base = buf.as_ptr() as usize;
        let (built, copy) = Self::parse(json, weights, Some(base))?;
        let weights = match copy {
            Some(c) => Weights::Copied(c),
            None => Weights::Container(buf),
        };
        Ok(built.finish(weights))
    }

    /// Parse and validate `program.json` and `weights.safetensors` (the weights are
    /// copied into secret memory).
    pub fn from_parts(json: &[u8], weights: &[u8]) -> Result<Program, Error> {
        let (built, copy) = Self::parse(json, weights, None)?;
        let copy = copy.ok_or_else(|| Error("internal: weights not copied".into()))?;
        Ok(built.finish(Weights::Copied(copy)))
    }

    /// `in_place`: the address of the buffer `weights` lies in, to use the weights
    /// in place (then no copy is returned if every float32 tensor is aligned).
    fn parse(
        json: &[u8],
        weights: &[u8],
        in_place: Option<usize>,
    ) -> Result<(Built, Option<SecretBuf<f32>>), Error> {
        let g: Value = serde_json::from_slice(json)
            .map_err(|e| Error(format!("program.json is not valid JSON ({e})")))?;
        let st = SafeTensors::deserialize(weights)
            .map_err(|e| Error(format!("weights.safetensors is invalid ({e})")))?;
        let base = in_place.filter(|_| {
            cfg!(target_endian = "little")
                && st.iter().all(|(_, v)| {
                    v.dtype() != Dtype::F32 || (v.data().as_ptr() as usize).is_multiple_of(4)
                })
        });
        Builder {
            st,
            base,
            weights: HashMap::new(),
            total: 0,
        }
        .build(&g)
    }

    /// Which kernel mechanism holds the weights.
    pub fn weights_backing(&self) -> Backing {
        self.weights.backing()
    }

    /// Number of floats in the weight buffer (in place: the whole container).
    pub fn weights_len(&self) -> usize {
        self.weights.floats().len()
    }

    /// Whether the weights are used in place in the container (no copy).
    pub fn weights_in_place(&self) -> bool {
        matches!(*self.weights, Weights::Container(_))
    }

    pub fn input_meta(&self) -> &TensorMeta {
        &self.tensors[self.input]
    }

    pub fn output_meta(&self) -> &TensorMeta {
        &self.tensors[self.output]
    }

    /// The weights slice of `w`.
    pub fn weight(&self, w: WRef) -> &[f32] {
        &self.weights.floats()[w.off..w.off + w.len]
    }
}

/// `(program.json, weights.safetensors)` of a container.
fn split_container(data: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    if data.len() < 16 || &data[..8] != MAGIC {
        return fail("not an enclave program container (bad magic)");
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&data[8..16]);
    let n = u64::from_le_bytes(len);
    let rest = &data[16..];
    if n > rest.len() as u64 {
        return fail("enclave program container is truncated (program.json runs past the end)");
    }
    Ok(rest.split_at(n as usize))
}

/// Offset of the tensor data inside a safetensors file (8 + header length), if the
/// file is long enough to say.
fn weights_data_offset(st: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(st.get(..8)?.try_into().ok()?);
    usize::try_from(n).ok()?.checked_add(8)
}

/// A validated graph whose weights are not attached yet.
struct Built {
    tensors: Vec<TensorMeta>,
    nodes: Vec<Node>,
    output: usize,
}

impl Built {
    fn finish(self, weights: Weights) -> Program {
        Program {
            tensors: self.tensors,
            nodes: self.nodes,
            input: 0,
            output: self.output,
            weights: Arc::new(weights),
        }
    }
}

// ---------------------------------------------------------------------------------
// JSON helpers

fn obj<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, Error> {
    v.as_object()
        .ok_or_else(|| Error(format!("{what} must be a JSON object")))
}

fn string<'a>(v: &'a Value, what: &str) -> Result<&'a str, Error> {
    v.as_str()
        .ok_or_else(|| Error(format!("{what} must be a string")))
}

fn uint(v: &Value, what: &str) -> Result<usize, Error> {
    match v.as_u64() {
        Some(x) if x <= MAX_DIM as u64 => Ok(x as usize),
        Some(_) => fail(format!("{what} is too large")),
        None => fail(format!("{what} must be a non-negative integer")),
    }
}

fn pos(v: &Value, what: &str) -> Result<usize, Error> {
    match uint(v, what)? {
        0 => fail(format!("{what} must be positive")),
        x => Ok(x),
    }
}

fn int(v: &Value, what: &str) -> Result<i64, Error> {
    v.as_i64()
        .filter(|x| x.unsigned_abs() <= MAX_DIM as u64)
        .ok_or_else(|| Error(format!("{what} must be an integer")))
}

fn float(v: &Value, what: &str) -> Result<f32, Error> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| Error(format!("{what} must be a number")))
}

fn boolean(v: &Value, what: &str) -> Result<bool, Error> {
    v.as_bool()
        .ok_or_else(|| Error(format!("{what} must be true or false")))
}

fn list<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>, Error> {
    v.as_array()
        .ok_or_else(|| Error(format!("{what} must be a list")))
}

fn list_n<'a>(v: &'a Value, n: usize, what: &str) -> Result<&'a Vec<Value>, Error> {
    let l = list(v, what)?;
    if l.len() != n {
        return fail(format!("{what} must have {n} entries, not {}", l.len()));
    }
    Ok(l)
}

fn checked_product(dims: &[usize], what: &str) -> Result<usize, Error> {
    let mut p = 1usize;
    for &d in dims {
        p = p
            .checked_mul(d)
            .filter(|&p| p <= MAX_SAMPLE_ELEMS)
            .ok_or_else(|| Error(format!("{what}: tensor of shape {dims:?} is too large")))?;
    }
    Ok(p)
}

/// Resolve an axis of a tensor of full rank `rank` (batch included) to 0..rank.
fn axis(v: &Value, rank: usize, what: &str) -> Result<usize, Error> {
    let a = int(v, what)?;
    let r = rank as i64;
    let a2 = if a < 0 { a + r } else { a };
    if a2 < 0 || a2 >= r {
        return fail(format!("{what} {a} is out of range for rank {rank}"));
    }
    Ok(a2 as usize)
}

/// A node's view of its JSON.
struct NodeCtx<'a> {
    name: String,
    attrs: Option<&'a Map<String, Value>>,
    weights: Option<&'a Map<String, Value>>,
}

impl<'a> NodeCtx<'a> {
    fn attr(&self, key: &str) -> Option<&'a Value> {
        self.attrs.and_then(|a| a.get(key))
    }
    fn req(&self, key: &str) -> Result<&'a Value, Error> {
        self.attr(key)
            .ok_or_else(|| Error(format!("node {:?}: missing attribute {key:?}", self.name)))
    }
    fn what(&self, key: &str) -> String {
        format!("node {:?}: attribute {key:?}", self.name)
    }
    fn e<T>(&self, msg: impl std::fmt::Display) -> Result<T, Error> {
        fail(format!("node {:?}: {msg}", self.name))
    }
    fn weight_key(&self, role: &str) -> Result<Option<&'a str>, Error> {
        match self.weights.and_then(|w| w.get(role)) {
            None => Ok(None),
            Some(v) => Ok(Some(string(
                v,
                &format!("node {:?}: weight {role:?}", self.name),
            )?)),
        }
    }
}

// ---------------------------------------------------------------------------------
// Building

struct Builder<'d> {
    st: SafeTensors<'d>,
    /// In place: the address of the (page-aligned) buffer holding the container;
    /// a weight's place is then its byte offset in that buffer / 4.
    base: Option<usize>,
    /// safetensors key -> (place, shape)
    weights: HashMap<String, (WRef, Vec<usize>)>,
    /// Copy: floats reserved so far.
    total: usize,
}

/// Weights start at multiples of 16 floats (64 bytes).
const WALIGN: usize = 16;

impl<'d> Builder<'d> {
    /// Look up (and reserve space for) a weight; returns its place and shape.
    fn weight(&mut self, key: &str, ctx: &NodeCtx) -> Result<(WRef, Vec<usize>), Error> {
        if let Some(w) = self.weights.get(key) {
            return Ok(w.clone());
        }
        let view = match self.st.tensor(key) {
            Ok(v) => v,
            Err(_) => return ctx.e(format!("weight {key:?} is not in weights.safetensors")),
        };
        if view.dtype() != Dtype::F32 {
            return ctx.e(format!(
                "weight {key:?} has dtype {:?}, not F32",
                view.dtype()
            ));
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
        let len = checked_product(&shape, &format!("node {:?}: weight {key:?}", ctx.name))?;
        if view.data().len() != len * 4 {
            return ctx.e(format!("weight {key:?} has the wrong data length"));
        }
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
    fn weight_shaped(
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

    fn build(mut self, g: &Value) -> Result<(Built, Option<SecretBuf<f32>>), Error> {
        let g = obj(g, "program.json")?;
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
        if inputs.len() != 1 || outputs.len() != 1 {
            return fail(format!(
                "version 1 programs have exactly one input and one output (got {} and {})",
                inputs.len(),
                outputs.len()
            ));
        }
        let nodes = list(g.get("nodes").unwrap_or(&Value::Null), "\"nodes\"")?;
        if nodes.len() > MAX_NODES {
            return fail(format!("too many nodes ({})", nodes.len()));
        }
        let (in_name, in_dims) = tensor_decl(&inputs[0], "input")?;
        let (out_name, out_dims) = tensor_decl(&outputs[0], "output")?;

        let mut tensors = vec![TensorMeta {
            name: in_name.clone(),
            dims: in_dims,
            batched: true,
            constant: None,
        }];
        let mut by_name: HashMap<String, usize> = HashMap::new();
        by_name.insert(in_name, 0);
        let mut out_nodes = Vec::with_capacity(nodes.len());

        for (i, nv) in nodes.iter().enumerate() {
            let n = obj(nv, &format!("node #{i}"))?;
            let name = match n.get("name") {
                Some(v) => string(v, &format!("node #{i}: \"name\""))?.to_string(),
                None => format!("#{i}"),
            };
            let ctx = NodeCtx {
                attrs: match n.get("attrs") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(obj(v, &format!("node {name:?}: \"attrs\""))?),
                },
                weights: match n.get("weights") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(obj(v, &format!("node {name:?}: \"weights\""))?),
                },
                name,
            };
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
                match by_name.get(t) {
                    Some(&id) => in_ids.push(id),
                    None => {
                        return ctx.e(format!(
                            "input {t:?} is not defined by an earlier node or the graph input"
                        ))
                    }
                }
            }
            if outs.len() != 1 {
                return ctx.e(format!("must have exactly one output, not {}", outs.len()));
            }
            let out_t = string(&outs[0], &format!("node {:?}: output name", ctx.name))?;
            if by_name.contains_key(out_t) {
                return ctx.e(format!("output {out_t:?} is already defined"));
            }
            let args: Vec<&TensorMeta> = in_ids.iter().map(|&id| &tensors[id]).collect();
            let (op, meta) = self.node(op, &ctx, &args)?;
            checked_product(&meta.0, &format!("node {:?}: output", ctx.name))?;
            if meta.0.len() + usize::from(meta.1) > MAX_RANK {
                return ctx.e(format!("output rank is above {MAX_RANK}"));
            }
            let id = tensors.len();
            tensors.push(TensorMeta {
                name: out_t.to_string(),
                dims: meta.0,
                batched: meta.1,
                constant: meta.2,
            });
            by_name.insert(out_t.to_string(), id);
            out_nodes.push(Node {
                name: ctx.name,
                op,
                inputs: in_ids,
                output: id,
            });
        }

        let Some(&output) = by_name.get(&out_name) else {
            return fail(format!(
                "graph output {out_name:?} is not produced by any node"
            ));
        };
        let ot = &tensors[output];
        if !ot.batched {
            return fail(format!("graph output {out_name:?} has no batch dimension"));
        }
        if ot.dims != out_dims {
            return fail(format!(
                "graph output {out_name:?} is declared with shape [null, {out_dims:?}] but the program computes [null, {:?}]",
                ot.dims
            ));
        }

        let built = Built {
            tensors,
            nodes: out_nodes,
            output,
        };
        if self.base.is_some() {
            return Ok((built, None));
        }
        // Copy the used weights into one secret buffer.
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
        Ok((built, Some(buf)))
    }

    /// Validate one node; returns its op and (output dims, batched, constant).
    #[allow(clippy::type_complexity)]
    fn node(
        &mut self,
        op: &str,
        ctx: &NodeCtx,
        args: &[&TensorMeta],
    ) -> Result<(Op, (Vec<usize>, bool, Option<WRef>)), Error> {
        if let Some(kind) = BinKind::from_op(op) {
            return self.binary(kind, ctx, args);
        }
        if op == "constant" {
            if !args.is_empty() {
                return ctx.e("a constant takes no inputs");
            }
            let Some(key) = ctx.weight_key("value")? else {
                return ctx.e("missing weight \"value\"");
            };
            let (w, shape) = self.weight(key, ctx)?;
            return Ok((Op::Constant, (shape, false, Some(w))));
        }
        if op == "concat" {
            return self.concat(ctx, args);
        }
        let known = [
            "dense",
            "conv",
            "pool",
            "global_pool",
            "reduce",
            "pad",
            "reshape",
            "transpose",
            "scale_shift",
            "layer_norm",
            "activation",
        ];
        if !known.contains(&op) {
            return ctx.e(format!("unknown op {op:?}"));
        }
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
        let d = &x.dims;
        let rank = d.len() + 1;
        let batched = |dims: Vec<usize>| (dims, true, None);
        Ok(match op {
            "dense" => {
                let Some(&k) = d.last() else {
                    return ctx.e("dense needs an input of rank >= 2");
                };
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
                (
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
                )
            }
            "conv" => self.conv(ctx, d)?,
            "pool" => {
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
                (
                    Op::Pool {
                        g,
                        max,
                        count_include_pad: cip,
                    },
                    batched(od),
                )
            }
            "global_pool" => {
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
                (Op::GlobalPool { s, c, max }, batched(od))
            }
            "reduce" => {
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
                (Op::Reduce(Reduce::new(kind, d, &red)), batched(od))
            }
            "pad" => {
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
                (Op::Pad(p), batched(od))
            }
            "reshape" => {
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
                (Op::Copy, batched(od))
            }
            "transpose" => {
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
                (Op::Transpose(t), batched(od))
            }
            "scale_shift" => {
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
                (
                    Op::ScaleShift {
                        c,
                        inner,
                        scale,
                        shift,
                    },
                    batched(d.clone()),
                )
            }
            "layer_norm" => {
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
                (
                    Op::LayerNorm {
                        inner,
                        eps,
                        gamma,
                        beta,
                    },
                    batched(d.clone()),
                )
            }
            "activation" => {
                let act = self.activation(ctx, Some(ctx.req("activation")?), d)?;
                (Op::Activation(act), batched(d.clone()))
            }
            _ => return ctx.e(format!("unknown op {op:?}")),
        })
    }

    /// Parse an activation object for a batched tensor of per-sample dims `dims`.
    fn activation(&self, ctx: &NodeCtx, v: Option<&Value>, dims: &[usize]) -> Result<Act, Error> {
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
            f => return fail(format!("{what}: unknown activation {f:?}")),
        })
    }

    /// Parse window geometry (conv when `kernel_win` is given, pool otherwise).
    fn window(
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
            None => {
                let l = list_n(ctx.req("window")?, ns, &ctx.what("window"))?;
                l.iter()
                    .map(|v| pos(v, &ctx.what("window")))
                    .collect::<Result<_, _>>()?
            }
        };
        let strides: Vec<usize> = list_n(ctx.req("strides")?, ns, &ctx.what("strides"))?
            .iter()
            .map(|v| pos(v, &ctx.what("strides")))
            .collect::<Result<_, _>>()?;
        let dil: Vec<usize> = match (kernel_win, ctx.attr("dilations")) {
            (Some(_), Some(v)) => list_n(v, ns, &ctx.what("dilations"))?
                .iter()
                .map(|v| pos(v, &ctx.what("dilations")))
                .collect::<Result<_, _>>()?,
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
        let c = d[ns];
        let g = if ns == 1 {
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
        };
        Ok((g, ns))
    }

    #[allow(clippy::type_complexity)]
    fn conv(
        &mut self,
        ctx: &NodeCtx,
        d: &[usize],
    ) -> Result<(Op, (Vec<usize>, bool, Option<WRef>)), Error> {
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
        let (g, _) = self.window(ctx, d, Some(&ks[..ks.len() - 2]))?;
        let bias = self.weight_shaped(ctx, "bias", &[cout], false)?;
        let od = spatial_out(d, &g, cout);
        checked_product(&od, &format!("node {:?}: output", ctx.name))?;
        let act = self.activation(ctx, ctx.attr("activation"), &od)?;
        Ok((
            Op::Conv {
                p: ConvParams {
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

    #[allow(clippy::type_complexity)]
    fn binary(
        &mut self,
        kind: BinKind,
        ctx: &NodeCtx,
        args: &[&TensorMeta],
    ) -> Result<(Op, (Vec<usize>, bool, Option<WRef>)), Error> {
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
        let batched = args.iter().any(|t| t.batched);
        // Per-sample rank of the result.
        let rank = if batched {
            let r = args.iter().find(|t| t.batched).map_or(0, |t| t.dims.len());
            for t in args {
                if t.batched && t.dims.len() != r {
                    return ctx.e("batched operands must have the same rank");
                }
                if !t.batched && t.dims.len() > r + 1 {
                    return ctx.e(format!("constant operand of shape {:?} has a higher rank than the batched operands", t.dims));
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
        let bcasts = aligned
            .iter()
            .zip(args)
            .map(|(a, t)| Bcast::new(&od, a, t.batched))
            .collect();
        Ok((Op::Binary { kind, bcasts }, (od, batched, None)))
    }

    #[allow(clippy::type_complexity)]
    fn concat(
        &mut self,
        ctx: &NodeCtx,
        args: &[&TensorMeta],
    ) -> Result<(Op, (Vec<usize>, bool, Option<WRef>)), Error> {
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

fn spatial_out(d: &[usize], g: &Geom, c: usize) -> Vec<usize> {
    if d.len() == 2 {
        vec![g.ow, c]
    } else {
        vec![g.oh, g.ow, c]
    }
}

/// `{"name": ..., "shape": [null, d...], "dtype": "float32"}` → (name, dims).
fn tensor_decl(v: &Value, what: &str) -> Result<(String, Vec<usize>), Error> {
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
        if dt.as_str() != Some("float32") {
            return fail(format!("graph {what} {name:?} must have dtype float32"));
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
