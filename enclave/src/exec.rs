//! Run a validated program on batches.
//!
//! `Executor::new` plans every intermediate buffer once for `max_batch` (buffers are
//! reused once the tensors in them are dead), allocates them in secret memory,
//! builds a persistent thread pool and does one warm-up run, so `run` itself never
//! allocates or spawns threads.
//!
//! A program with several graph inputs takes them packed per sample (sample i's
//! first input, then its second, ...: what the host writes into the shared region);
//! `run_in_place` first copies each input's part into that input's own buffer.

use std::sync::Arc;

use crate::ops::{binary, conv, conv_transpose, dense, matmul, misc, qdense, resize, slice, Act};
use crate::program::{Error, Node, Op, Program, QWeight, TensorMeta, WRef, Weights};
use crate::secmem::SecretBuf;
use crate::team::Team;

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    Slot(usize),
    Weight(WRef),
}

struct State {
    nodes: Vec<Node>,
    tensors: Vec<TensorMeta>,
    weights: Arc<Weights>,
    loc: Vec<Loc>,
    slots: Vec<Option<SecretBuf<f32>>>,
    scratch: SecretBuf<f32>,
    /// The graph inputs (tensor indices, in declaration order).
    inputs: Vec<usize>,
    /// With several inputs: the packed per-sample input (`max_batch × in_len`).
    packed: Option<SecretBuf<f32>>,
    /// Floats per sample of all inputs together.
    in_len: usize,
    output: usize,
    threads: usize,
    /// Nodes that move no data (see `aliases`): their output is their input's buffer.
    skip: Vec<bool>,
}

pub struct Executor {
    state: State,
    pool: Arc<rayon::ThreadPool>,
    /// Runs the kernels' parallel loops (`ops::par_for`): helpers that spin between
    /// layers and requests instead of sleeping (see `crate::team`).
    team: Team,
    max_batch: usize,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("max_batch", &self.max_batch)
            .field("threads", &self.state.threads)
            .field("slots", &self.state.slots.len())
            .finish()
    }
}

/// The number of threads `Executor::new` uses for `threads == 0`.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The team's spin window until `set_spin_us` (the worker's default `--spin-us`).
const DEFAULT_TEAM_SPIN_US: u64 = 200;

/// Batches up to this size find their activation pages already faulted in.
const PREFAULT_BATCH: usize = 64;

fn err<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error(msg.into()))
}

impl Executor {
    /// Plan buffers for batches of up to `max_batch` samples and start a pool of
    /// `threads` worker threads (0 = `available_parallelism`).
    pub fn new(program: &Program, max_batch: usize, threads: usize) -> Result<Executor, Error> {
        if max_batch == 0 {
            return err("max_batch must be at least 1");
        }
        let threads = if threads == 0 {
            default_threads()
        } else {
            threads
        }
        .min(256);
        let tensors = program.tensors.clone();
        let mut nodes = program.nodes.clone();
        crate::program::fuse_conv_pools(&mut nodes, program.output);
        let nt = tensors.len();

        let (root, skip) = aliases(&nodes, &tensors);
        // Last node index reading each buffer, by its root tensor (the graph output
        // lives to the end).
        let mut last_use: Vec<Option<usize>> = vec![None; nt];
        for (i, n) in nodes.iter().enumerate() {
            for &t in &n.inputs {
                last_use[root[t]] = Some(i);
            }
        }
        let out_root = root[program.output];
        let size = |t: usize| -> Result<usize, Error> {
            let m = &tensors[t];
            let b = if m.batched { max_batch } else { 1 };
            m.sample_len()
                .checked_mul(b)
                .filter(|&v| v <= isize::MAX as usize / 8)
                .ok_or_else(|| {
                    Error(format!(
                        "tensor {:?} is too large for batch {max_batch}",
                        m.name
                    ))
                })
        };

        let mut caps: Vec<usize> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut loc = vec![Loc::Slot(usize::MAX); nt];
        let take_slot = |need: usize, caps: &mut Vec<usize>, free: &mut Vec<usize>| -> usize {
            // best fit among free slots; else grow the largest free one; else a new one
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, &s)| caps[s] >= need)
                .min_by_key(|(_, &s)| caps[s])
                .map(|(i, _)| i)
                .or_else(|| {
                    free.iter()
                        .enumerate()
                        .max_by_key(|(_, &s)| caps[s])
                        .map(|(i, _)| i)
                });
            match best {
                Some(i) => {
                    let s = free.swap_remove(i);
                    caps[s] = caps[s].max(need);
                    s
                }
                None => {
                    caps.push(need);
                    caps.len() - 1
                }
            }
        };
        // Per slot: the floats batches of up to `warm` samples use (faulted in now).
        let warm = max_batch.min(PREFAULT_BATCH);
        let mut warm_caps: Vec<usize> = Vec::new();
        let mut note_warm = |s: usize, t: usize| {
            let m = &tensors[t];
            let need = m.sample_len() * if m.batched { warm } else { 1 };
            if warm_caps.len() <= s {
                warm_caps.resize(s + 1, 0);
            }
            warm_caps[s] = warm_caps[s].max(need);
        };
        // Every input gets its own slot before any is released, so no two share one.
        for &t in &program.inputs {
            let s = take_slot(size(t)?, &mut caps, &mut free);
            loc[t] = Loc::Slot(s);
            note_warm(s, t);
        }
        let mut scratch_len = 0usize;
        let mut warm_scratch = 0usize;
        // `t` is a root tensor whose last reader has run.
        let release = |t: usize, free: &mut Vec<usize>, loc: &[Loc]| {
            if let Loc::Slot(s) = loc[t] {
                if t != out_root && !free.contains(&s) {
                    free.push(s);
                }
            }
        };
        for &t in &program.inputs {
            if last_use[t].is_none() {
                release(t, &mut free, &loc);
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            let t = n.output;
            if skip[i] {
                loc[t] = loc[root[t]];
                continue;
            }
            match &n.op {
                Op::Constant => {
                    let Some(w) = tensors[t].constant else {
                        return err("internal: constant without weight");
                    };
                    loc[t] = Loc::Weight(w);
                }
                op => {
                    if let Op::Conv { p, .. } = op {
                        scratch_len = scratch_len.max(p.scratch_len(max_batch, threads));
                        warm_scratch = warm_scratch.max(p.scratch_len(warm, threads));
                    }
                    if let Op::Dense {
                        rows, panels: true, ..
                    } = op
                    {
                        let len = |b: usize| dense::scratch_len(b * rows, threads);
                        scratch_len = scratch_len.max(len(max_batch));
                        warm_scratch = warm_scratch.max(len(warm));
                    }
                    if let Op::QDense {
                        rows,
                        k,
                        kernel: QWeight::Int8 { .. },
                        ..
                    } = op
                    {
                        let len = |b: usize| qdense::scratch_len(b * rows, *k);
                        scratch_len = scratch_len.max(len(max_batch));
                        warm_scratch = warm_scratch.max(len(warm));
                    }
                    if let Op::Matmul(mm) = op {
                        scratch_len = scratch_len.max(mm.scratch_len(threads));
                        warm_scratch = warm_scratch.max(mm.scratch_len(threads));
                    }
                    if let Op::QConv { p, .. } = op {
                        scratch_len = scratch_len.max(p.scratch_len(max_batch, threads));
                        warm_scratch = warm_scratch.max(p.scratch_len(warm, threads));
                    }
                    if let Op::ConvTranspose { p, .. } = op {
                        scratch_len = scratch_len.max(p.scratch_len(max_batch));
                        warm_scratch = warm_scratch.max(p.scratch_len(warm));
                    }
                    let s = take_slot(size(t)?, &mut caps, &mut free);
                    note_warm(s, t);
                    loc[t] = Loc::Slot(s);
                }
            }
            let mut dead: Vec<usize> = n
                .inputs
                .iter()
                .map(|&x| root[x])
                .filter(|&r| last_use[r] == Some(i))
                .collect();
            if last_use[t].is_none() {
                dead.push(t);
            }
            dead.sort_unstable();
            dead.dedup();
            for x in dead {
                release(x, &mut free, &loc);
            }
        }

        let mut slots = Vec::with_capacity(caps.len());
        for &c in &caps {
            slots.push(Some(SecretBuf::<f32>::new(c).map_err(|e| {
                Error(format!("cannot allocate {c} floats for activations ({e})"))
            })?));
        }
        let mut scratch = SecretBuf::<f32>::new(scratch_len).map_err(|e| {
            Error(format!(
                "cannot allocate {scratch_len} floats of scratch ({e})"
            ))
        })?;
        // Fault in the activation pages batches of up to PREFAULT_BATCH samples use
        // (secret-memory faults are slow, ~20 µs a page, and such runs should not
        // take them; larger batches fault their extra pages in once, on first use).
        // Before the thread team exists: each fault's TLB-flush IPI takes about twice
        // as long when the other core is busy (a spinning helper) as when it is idle.
        for (s, &w) in slots.iter_mut().zip(&warm_caps) {
            if let Some(s) = s {
                let n = w.min(s.len());
                prefault(&mut s[..n]);
            }
        }
        let ws = warm_scratch.min(scratch.len());
        prefault(&mut scratch[..ws]);
        let in_len = program
            .inputs
            .iter()
            .map(|&t| tensors[t].sample_len())
            .try_fold(0usize, usize::checked_add)
            .ok_or_else(|| Error("the program's inputs are too large".into()))?;
        let packed = if program.inputs.len() > 1 {
            let n = in_len
                .checked_mul(max_batch)
                .filter(|&v| v <= isize::MAX as usize / 8)
                .ok_or_else(|| Error(format!("the inputs are too large for batch {max_batch}")))?;
            let mut b = SecretBuf::<f32>::new(n)
                .map_err(|e| Error(format!("cannot allocate {n} floats for the inputs ({e})")))?;
            let w = (in_len * warm).min(n);
            prefault(&mut b[..w]);
            Some(b)
        } else {
            None
        };
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("enclave-worker-{i}"))
                .build()
                .map_err(|e| Error(format!("cannot start {threads} worker threads ({e})")))?,
        );
        let team = Team::new(threads, DEFAULT_TEAM_SPIN_US)
            .map_err(|e| Error(format!("cannot start {threads} worker threads ({e})")))?;
        let mut ex = Executor {
            state: State {
                nodes,
                tensors,
                weights: program.weights.clone(),
                loc,
                slots,
                scratch,
                inputs: program.inputs.clone(),
                packed,
                in_len,
                output: program.output,
                threads,
                skip,
            },
            pool,
            team,
            max_batch,
        };
        // Warm up (the pool's threads, gemm's per-thread packing buffers, CPU-feature
        // detection) on a small batch and on batch 1: a full max_batch run would only
        // repeat the same code paths.
        let warm = max_batch.min(16);
        let inp = vec![0.0f32; ex.input_len_per_sample() * warm];
        let mut out = vec![0.0f32; ex.output_len_per_sample() * warm];
        ex.run(&inp, warm, &mut out)?;
        if warm > 1 {
            let o1 = ex.output_len_per_sample();
            ex.run(&inp[..ex.input_len_per_sample()], 1, &mut out[..o1])?;
        }
        Ok(ex)
    }

    /// Per-sample shape of the first input (batch dim excluded).
    pub fn input_shape(&self) -> &[usize] {
        &self.state.tensors[self.state.inputs[0]].dims
    }

    /// Per-sample shape of every input, in declaration order.
    pub fn input_shapes(&self) -> Vec<&[usize]> {
        let s = &self.state;
        s.inputs.iter().map(|&t| &s.tensors[t].dims[..]).collect()
    }

    /// Per-sample output shape (batch dim excluded).
    pub fn output_shape(&self) -> &[usize] {
        &self.state.tensors[self.state.output].dims
    }

    /// Floats per sample of all inputs together.
    pub fn input_len_per_sample(&self) -> usize {
        self.state.in_len
    }

    pub fn output_len_per_sample(&self) -> usize {
        self.state.tensors[self.state.output].sample_len()
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn threads(&self) -> usize {
        self.state.threads
    }

    /// How long the team's helpers spin for the next layer or request before they
    /// sleep (the worker passes its `--spin-us`).
    pub fn set_spin_us(&self, spin_us: u64) {
        self.team.set_spin_us(spin_us);
    }

    /// The executor's thread pool. Running the caller's own loop inside it
    /// (`pool.install(..)`) makes every `run` start on a pool thread, which saves the
    /// hand-off to the pool and back (two thread wake-ups) per call.
    pub fn pool(&self) -> Arc<rayon::ThreadPool> {
        self.pool.clone()
    }

    /// The private input buffer for a batch of `batch` (`batch × input_len_per_sample()`
    /// floats; several inputs packed per sample): fill it, then call
    /// [`Executor::run_in_place`]. Saves the copy `run` makes when the caller can write
    /// its input straight here.
    pub fn input_mut(&mut self, batch: usize) -> Result<&mut [f32], Error> {
        self.check_batch(batch)?;
        let n = self.input_len_per_sample() * batch;
        let s = &mut self.state;
        if let Some(p) = s.packed.as_deref_mut() {
            return p
                .get_mut(..n)
                .ok_or_else(|| Error("internal: packed input buffer".into()));
        }
        let Loc::Slot(si) = s.loc[s.inputs[0]] else {
            return err("internal: input location");
        };
        s.slots
            .get_mut(si)
            .and_then(|b| b.as_deref_mut())
            .and_then(|b| b.get_mut(..n))
            .ok_or_else(|| Error("internal: input buffer".into()))
    }

    /// Run on the `batch` samples already in [`Executor::input_mut`]; returns the
    /// output (`batch × output_len_per_sample()` floats), valid until the next call.
    pub fn run_in_place(&mut self, batch: usize) -> Result<&[f32], Error> {
        self.check_batch(batch)?;
        self.state.unpack_inputs(batch)?;
        let state = &mut self.state;
        let team = &self.team;
        self.pool
            .install(|| team.install(|| state.run_nodes(batch)))?;
        let s = &self.state;
        view(&s.slots, &s.weights, &s.tensors, &s.loc, s.output, batch)
    }

    fn check_batch(&self, batch: usize) -> Result<(), Error> {
        if batch == 0 || batch > self.max_batch {
            return err(format!(
                "batch size {batch} is not in 1..={}",
                self.max_batch
            ));
        }
        Ok(())
    }

    /// Run on `batch` samples: `input` holds `batch × input_len_per_sample()`
    /// floats, `output` receives `batch × output_len_per_sample()`.
    pub fn run(&mut self, input: &[f32], batch: usize, output: &mut [f32]) -> Result<(), Error> {
        if batch == 0 || batch > self.max_batch {
            return err(format!(
                "batch size {batch} is not in 1..={}",
                self.max_batch
            ));
        }
        let (il, ol) = (
            self.input_len_per_sample() * batch,
            self.output_len_per_sample() * batch,
        );
        if input.len() != il || output.len() != ol {
            return err(format!(
                "batch of {batch} needs {il} input and {ol} output floats, got {} and {}",
                input.len(),
                output.len()
            ));
        }
        self.input_mut(batch)?.copy_from_slice(input);
        output.copy_from_slice(self.run_in_place(batch)?);
        Ok(())
    }
}

/// Reshapes and linear activations move no data, so their output can share their
/// input's buffer instead of being a copy of it. Returns, per tensor, the root tensor
/// whose buffer it uses (itself unless aliased), and per node whether it is skipped.
fn aliases(nodes: &[Node], tensors: &[TensorMeta]) -> (Vec<usize>, Vec<bool>) {
    let mut root: Vec<usize> = (0..tensors.len()).collect();
    let mut skip = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let no_op = match &n.op {
            Op::Copy => true,
            Op::Activation(a) => a.is_linear(),
            _ => false,
        };
        let [x] = n.inputs[..] else { continue };
        let (xm, ym) = (&tensors[x], &tensors[n.output]);
        // Weights stay read-only: a constant's reshape still gets its own buffer.
        if no_op
            && xm.constant.is_none()
            && xm.batched == ym.batched
            && xm.sample_len() == ym.sample_len()
        {
            root[n.output] = root[x];
            skip[i] = true;
        }
    }
    (root, skip)
}

/// Touch every page of a fresh (all-zero) buffer so it is mapped now.
fn prefault(b: &mut [f32]) {
    let step = 4096 / std::mem::size_of::<f32>();
    for i in (0..b.len()).step_by(step) {
        // SAFETY: i < len; a volatile write of the value already there (zero) only
        // forces the page in.
        unsafe { std::ptr::write_volatile(&mut b[i], 0.0) };
    }
}

/// Data of tensor `t` for a batch of `batch`.
/// A quantised kernel's slices of the weight buffer.
fn qkernel<'a>(q: &QWeight, w: &impl Fn(WRef) -> &'a [f32]) -> qdense::QKernel<'a> {
    match *q {
        QWeight::Bf16(d) => qdense::QKernel::Bf16(qdense::as_u16(w(d))),
        QWeight::Int8 { data, scale } => qdense::QKernel::Int8 {
            q: qdense::as_i8(w(data)),
            scale: w(scale),
        },
    }
}

fn view<'a>(
    slots: &'a [Option<SecretBuf<f32>>],
    weights: &'a Weights,
    tensors: &[TensorMeta],
    loc: &[Loc],
    t: usize,
    batch: usize,
) -> Result<&'a [f32], Error> {
    let m = &tensors[t];
    let len = m.sample_len() * if m.batched { batch } else { 1 };
    let data: Option<&[f32]> = match loc[t] {
        Loc::Slot(s) => slots
            .get(s)
            .and_then(|b| b.as_deref())
            .and_then(|b| b.get(..len)),
        Loc::Weight(w) => weights.floats().get(w.off..w.off + w.len),
    };
    data.ok_or_else(|| Error(format!("internal: tensor {:?} has no buffer", m.name)))
}

impl State {
    /// With several inputs: copy each input's part of every packed sample into the
    /// input's own buffer.
    fn unpack_inputs(&mut self, batch: usize) -> Result<(), Error> {
        let Some(packed) = self.packed.as_deref() else {
            return Ok(());
        };
        let mut off = 0;
        for &t in &self.inputs {
            let len = self.tensors[t].sample_len();
            let Loc::Slot(si) = self.loc[t] else {
                return err("internal: input location");
            };
            let Some(dst) = self
                .slots
                .get_mut(si)
                .and_then(|b| b.as_deref_mut())
                .and_then(|b| b.get_mut(..len * batch))
            else {
                return err("internal: input buffer");
            };
            for (i, d) in dst.chunks_exact_mut(len).enumerate() {
                let at = i * self.in_len + off;
                d.copy_from_slice(&packed[at..at + len]);
            }
            off += len;
        }
        Ok(())
    }

    fn run_nodes(&mut self, batch: usize) -> Result<(), Error> {
        for i in 0..self.nodes.len() {
            self.node(i, batch)?;
        }
        Ok(())
    }

    fn node(&mut self, i: usize, batch: usize) -> Result<(), Error> {
        let node = &self.nodes[i];
        if self.skip[i] || matches!(node.op, Op::Constant) {
            return Ok(());
        }
        let Loc::Slot(so) = self.loc[node.output] else {
            return err("internal: output location");
        };
        let Some(mut out) = self.slots.get_mut(so).and_then(Option::take) else {
            return err("internal: output buffer in use");
        };
        let r = self.compute(i, batch, &mut out);
        self.slots[so] = Some(out);
        r
    }

    fn compute(&mut self, i: usize, batch: usize, out: &mut SecretBuf<f32>) -> Result<(), Error> {
        let node = &self.nodes[i];
        let om = &self.tensors[node.output];
        let nb = if om.batched { batch } else { 1 };
        let Some(y) = out.get_mut(..om.sample_len() * nb) else {
            return err("internal: output buffer size");
        };
        let (slots, weights, tensors, loc) =
            (&self.slots, &*self.weights, &self.tensors, &self.loc);
        let x = |k: usize| -> Result<&[f32], Error> {
            let t = *node
                .inputs
                .get(k)
                .ok_or_else(|| Error("internal: missing input".into()))?;
            view(slots, weights, tensors, loc, t, batch)
        };
        let w = |r: WRef| -> &[f32] { &weights.floats()[r.off..r.off + r.len] };
        let threads = self.threads;
        match &node.op {
            Op::Dense {
                rows,
                k,
                n,
                kernel,
                panels,
                bias,
                act,
            } => {
                let kernel = if *panels {
                    dense::Kernel::Panels(w(*kernel))
                } else {
                    dense::Kernel::Rows(w(*kernel))
                };
                let (m, s) = (batch * rows, &mut self.scratch);
                // A ReLU is applied by the kernels as they store (no pass over y).
                let relu = *act == Act::Relu;
                dense::dense_scratch(x(0)?, kernel, bias.map(w), y, m, *k, *n, threads, s, relu);
                if !relu {
                    act.apply_par(y, threads);
                }
            }
            Op::Conv { p, kernel, bias } => {
                conv::conv(
                    x(0)?,
                    w(*kernel),
                    bias.map(w),
                    y,
                    batch,
                    p,
                    &mut self.scratch,
                    threads,
                );
            }
            Op::QDense {
                rows,
                k,
                n,
                kernel,
                bias,
                act,
            } => {
                let q = qkernel(kernel, &w);
                // A ReLU is applied by the kernels as they store (no pass over y).
                let relu = *act == Act::Relu;
                let m = batch * rows;
                let s = &mut self.scratch;
                qdense::qdense_act(x(0)?, q, bias.map(w), y, m, *k, *n, threads, relu, s);
                if !relu {
                    act.apply_par(y, threads);
                }
            }
            Op::QConv { p, kernel, bias } => {
                let q = qkernel(kernel, &w);
                let s = &mut self.scratch;
                qdense::qconv(x(0)?, q, bias.map(w), y, batch, p, s, threads);
            }
            Op::ConvTranspose { p, kernel, bias } => {
                conv_transpose::conv_transpose(
                    x(0)?,
                    w(*kernel),
                    bias.map(w),
                    y,
                    batch,
                    p,
                    &mut self.scratch,
                    threads,
                );
            }
            Op::Resize(r) => resize::resize(x(0)?, y, batch, r, threads),
            Op::Slice(s) => slice::slice(x(0)?, y, batch, s),
            Op::Pool {
                g,
                max,
                count_include_pad,
            } => conv::pool(x(0)?, y, batch, g, *max, *count_include_pad, threads),
            Op::GlobalPool { s, c, max } => conv::global_pool(x(0)?, y, batch, *s, *c, *max),
            Op::Reduce(r) => misc::reduce(x(0)?, y, batch, r),
            Op::Pad(p) => misc::pad(x(0)?, y, batch, p),
            Op::Copy => y.copy_from_slice(x(0)?),
            Op::Transpose(t) => {
                let xs = x(0)?;
                par_chunks(y, t.sample, threads, &|first, ys| {
                    let rows = ys.len() / t.sample;
                    misc::transpose(&xs[first * t.sample..], ys, rows, t);
                });
            }
            Op::ScaleShift {
                c,
                inner,
                scale,
                shift,
            } => misc::scale_shift(x(0)?, y, *c, *inner, w(*scale), w(*shift)),
            Op::LayerNorm {
                inner,
                eps,
                gamma,
                beta,
            } => {
                let (xs, g, b) = (x(0)?, gamma.map(w), beta.map(w));
                par_chunks(y, *inner, threads, &|first, ys| {
                    let xr = &xs[first * inner..][..ys.len()];
                    misc::layer_norm(xr, ys, *inner, *eps, g, b);
                });
            }
            Op::Binary { kind, bcasts } => {
                if bcasts.len() < 2 {
                    return err("internal: binary arity");
                }
                if bcasts.len() > MAX_PAR_OPERANDS || nb < 2 {
                    binary::binary(*kind, y, (x(0)?, &bcasts[0]), (x(1)?, &bcasts[1]), nb);
                    for (k, bc) in bcasts.iter().enumerate().skip(2) {
                        binary::inplace(*kind, y, (x(k)?, bc), nb);
                    }
                } else {
                    let mut ins: [&[f32]; MAX_PAR_OPERANDS] = [&[]; MAX_PAR_OPERANDS];
                    for (k, v) in ins.iter_mut().enumerate().take(bcasts.len()) {
                        *v = x(k)?;
                    }
                    binary_par(*kind, y, &ins[..bcasts.len()], bcasts, nb, threads);
                }
            }
            Op::Concat { outer, parts } => {
                let total: usize = parts.iter().sum();
                let mut off = 0;
                for (k, &p) in parts.iter().enumerate() {
                    misc::concat_one(x(k)?, y, batch * outer, p, off, total);
                    off += p;
                }
            }
            Op::Constant => {}
            Op::Gather(g) => {
                matmul::gather(x(0)?, w(g.table), y, g)
                    .map_err(|e| Error(format!("node {:?}: {e}", node.name)))?;
            }
            Op::Matmul(mm) => {
                matmul::matmul(x(0)?, x(1)?, y, batch, mm, &mut self.scratch, threads)
            }
            Op::Softmax { act, mask } => {
                match mask {
                    Some(bc) => {
                        if bc.len() < 2 {
                            return err("internal: softmax mask");
                        }
                        let ins = [x(0)?, x(1)?];
                        binary_par(binary::BinKind::Add, y, &ins, &bc[..2], nb, threads);
                    }
                    None => y.copy_from_slice(x(0)?),
                }
                act.apply_par(y, threads);
            }
            Op::Where(s) => binary::select(y, x(0)?, x(1)?, x(2)?, s, nb),
            Op::Expand(bc) => binary::broadcast_copy(y, (x(0)?, bc), batch),
            Op::Activation(a) => {
                y.copy_from_slice(x(0)?);
                a.apply_par(y, threads);
            }
        }
        Ok(())
    }
}

/// Floats per task at least for the elementwise and per-row ops the executor splits
/// itself (transpose, binary, layer norm, a softmax's mask): smaller ones run on one
/// thread, where handing half to the team's helper would cost more than it saves. On
/// the MiniLM-shaped transformer blocks at batch 32 these ops had run on one thread
/// (a transpose 1.0–1.5 ms, a residual add 1.5 ms, a layer norm 1.0 ms each).
const PAR_MIN_FLOATS: usize = 1 << 15;
/// Operands of a binary op that [`binary_par`] takes (more: one thread).
const MAX_PAR_OPERANDS: usize = 8;

/// `f(first, rows)` for up to `threads` contiguous ranges of whole `row_len`-float
/// rows of `y` (`first`: the range's first row), each of ≥ `PAR_MIN_FLOATS` floats.
fn par_chunks<F: Fn(usize, &mut [f32]) + Sync>(
    y: &mut [f32],
    row_len: usize,
    threads: usize,
    f: &F,
) {
    let parts = threads.min(y.len() / PAR_MIN_FLOATS).max(1);
    crate::ops::par_row_ranges(y, row_len, parts, f);
}

/// `y = ins[0] ⊕ ins[1] ⊕ …` (a left fold, broadcasting) over `nb` samples, split by
/// samples: each task's operands start at its first sample's offset in each of them
/// (an unbatched operand, batch stride 0, is shared whole).
fn binary_par(
    kind: binary::BinKind,
    y: &mut [f32],
    ins: &[&[f32]],
    bcasts: &[binary::Bcast],
    nb: usize,
    threads: usize,
) {
    let sample = y.len() / nb.max(1);
    par_chunks(y, sample, threads, &|first, ys| {
        let rows = ys.len() / sample.max(1);
        let at = |k: usize| &ins[k][first * bcasts[k].batch_stride..];
        binary::binary(kind, ys, (at(0), &bcasts[0]), (at(1), &bcasts[1]), rows);
        for (k, bc) in bcasts.iter().enumerate().skip(2) {
            binary::inplace(kind, ys, (at(k), bc), rows);
        }
    });
}
