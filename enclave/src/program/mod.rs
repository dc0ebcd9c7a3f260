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
//!
//! Layout: this file holds the types and the container framing; `builder` walks the
//! graph and dispatches each node to its op family (`linear`: dense, conv and the
//! window geometry; `pool`: pooling and reductions; `elementwise`: binary ops and
//! activations; `norm`: scale/shift and layer norm; `shape`: constant, reshape,
//! transpose, pad, concat, slice; `resize`: nearest and linear resize); `json`
//! has the checked JSON accessors they share.

use std::ops::Range;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::ops::binary::{Bcast, BinKind, Select};
use crate::ops::conv::{ConvParams, Geom};
use crate::ops::conv_transpose::ConvTParams;
use crate::ops::matmul::{Gather, Matmul};
use crate::ops::misc::{Pad, Reduce, Transpose};
use crate::ops::resize::Resize;
use crate::ops::slice::Slice;
use crate::ops::Act;
use crate::secmem::{Backing, SecretBuf};

mod attention;
mod builder;
mod elementwise;
mod json;
mod linear;
mod norm;
mod pool;
mod quant;
mod resize;
mod shape;

use builder::Builder;
pub use pool::fuse_conv_pools;

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
/// Most graph inputs a program may declare (the cut tensor plus model inputs such as
/// a padding mask and segment ids).
pub const MAX_INPUTS: usize = 16;

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

/// A weight tensor's place in the weight buffer (`Weights::floats`), in floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WRef {
    pub off: usize,
    pub len: usize,
}

/// A quantised kernel: its packed data (`WRef` counting bytes / 4) and, for int8, the
/// per-column scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QWeight {
    Bf16(WRef),
    Int8 { data: WRef, scale: WRef },
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
    /// A dense node whose kernel is stored as bf16 or int8 (`panels32x2` / `x4`).
    QDense {
        rows: usize,
        k: usize,
        n: usize,
        kernel: QWeight,
        bias: Option<WRef>,
        act: Act,
    },
    /// A one-group conv whose kernel is stored as bf16 or int8.
    QConv {
        p: ConvParams,
        kernel: QWeight,
        bias: Option<WRef>,
    },
    /// Kernel `[Cin, k..., Cout/groups]`.
    ConvTranspose {
        p: ConvTParams,
        kernel: WRef,
        bias: Option<WRef>,
    },
    Resize(Resize),
    Slice(Slice),
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
    /// Product of two computed tensors, per batch × leading-axes slice.
    Matmul(Matmul),
    /// Softmax (`act` is an `Act::Softmax`) of x, or of x + mask (broadcasts of x and
    /// the mask, as for `add`).
    Softmax {
        act: Act,
        mask: Option<Vec<Bcast>>,
    },
    /// Embedding lookup: one table row per id.
    Gather(Gather),
    /// `where(cond, x, y)`, broadcasting.
    Where(Select),
    /// The input broadcast to a larger shape.
    Expand(Bcast),
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

/// A validated program: nodes in execution order, tensor metadata, weights. The
/// graph inputs are tensors `0..inputs.len()`, in declaration order.
pub struct Program {
    pub tensors: Vec<TensorMeta>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<usize>,
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
                    !matches!(v.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::I8)
                        || (v.data().as_ptr() as usize).is_multiple_of(4)
                })
        });
        Builder::new(st, base).build(&g)
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

    /// The first graph input (the only one of a single-input program).
    pub fn input_meta(&self) -> &TensorMeta {
        &self.tensors[self.inputs[0]]
    }

    /// Every graph input, in declaration order.
    pub fn input_metas(&self) -> impl Iterator<Item = &TensorMeta> {
        self.inputs.iter().map(|&t| &self.tensors[t])
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

/// Weights start at multiples of 16 floats (64 bytes).
const WALIGN: usize = 16;

/// A validated graph whose weights are not attached yet.
struct Built {
    tensors: Vec<TensorMeta>,
    nodes: Vec<Node>,
    num_inputs: usize,
    output: usize,
}

impl Built {
    fn finish(self, weights: Weights) -> Program {
        Program {
            tensors: self.tensors,
            nodes: self.nodes,
            inputs: (0..self.num_inputs).collect(),
            output: self.output,
            weights: Arc::new(weights),
        }
    }
}
