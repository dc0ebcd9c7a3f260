//! A MiniLM-shaped encoder block (sequence 128, hidden 384, 12 heads, intermediate
//! 1536) runs without a single heap allocation once the executor is built: attention's
//! products, softmax, layer norms and the gelu feed-forward all use planned buffers.
//! (Its own test binary: the counting allocator sees every thread of the process.)
//! The portable family (`ENNCLAVE_KERNEL=portable`, CPUs without AVX2) hands batches to
//! the `gemm` crate, which allocates packing buffers per call: there the test only
//! counts.

mod common;
use common::*;
use ennclave_enclave::exec::Executor;
use ennclave_enclave::ops::dense::{isa, Isa};
use ennclave_enclave::program::Program;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static ARMED: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SEQ: usize = 128;
const HID: usize = 384;
const HEADS: usize = 12;
const DH: usize = HID / HEADS;
const FF: usize = 4 * HID;

/// One post-norm encoder block as the Keras adapter lowers it.
fn block_json() -> String {
    let dense = |name: &str, x: &str, k: &str, b: &str, act: &str| {
        format!(
            r#"{{"name": "{name}", "op": "dense", "inputs": ["{x}"], "outputs": ["{name}"], "attrs": {{{act}}}, "weights": {{"kernel": "{k}", "bias": "{b}"}}}}"#
        )
    };
    let node = |name: &str, op: &str, ins: &str, attrs: &str| {
        format!(
            r#"{{"name": "{name}", "op": "{op}", "inputs": [{ins}], "outputs": ["{name}"], "attrs": {attrs}}}"#
        )
    };
    let heads = |n: &str| {
        [
            node(
                &format!("{n}r"),
                "reshape",
                &format!(r#""{n}""#),
                &format!(r#"{{"shape": [{SEQ}, {HEADS}, {DH}]}}"#),
            ),
            node(
                &format!("{n}t"),
                "transpose",
                &format!(r#""{n}r""#),
                r#"{"perm": [0, 2, 1, 3]}"#,
            ),
        ]
        .join(",\n")
    };
    let nodes = [
        dense("q", "x", "wq", "bq", ""),
        dense("k", "x", "wk", "bk", ""),
        dense("v", "x", "wv", "bv", ""),
        heads("q"),
        heads("k"),
        heads("v"),
        node("s", "matmul", r#""qt", "kt""#, r#"{"transpose_b": true}"#),
        node("p", "softmax", r#""s""#, r#"{"axis": -1}"#),
        node("c", "matmul", r#""p", "vt""#, "{}"),
        node("ct", "transpose", r#""c""#, r#"{"perm": [0, 2, 1, 3]}"#),
        node(
            "cr",
            "reshape",
            r#""ct""#,
            &format!(r#"{{"shape": [{SEQ}, {HID}]}}"#),
        ),
        dense("o", "cr", "wo", "bo", ""),
        node("r1", "add", r#""o", "x""#, "{}"),
        node(
            "n1",
            "layer_norm",
            r#""r1""#,
            r#"{"axes": [-1], "epsilon": 1e-12}"#,
        ),
        dense("f1", "n1", "w1", "b1", r#""activation": {"fn": "gelu"}"#),
        dense("f2", "f1", "w2", "b2", ""),
        node("r2", "add", r#""f2", "n1""#, "{}"),
        node(
            "y",
            "layer_norm",
            r#""r2""#,
            r#"{"axes": [-1], "epsilon": 1e-12}"#,
        ),
    ];
    format!(
        r#"{{"format": "ennclave-program", "version": 1,
  "inputs": [{{"name": "x", "shape": [null, {SEQ}, {HID}]}}],
  "outputs": [{{"name": "y", "shape": [null, {SEQ}, {HID}]}}],
  "nodes": [{}]}}"#,
        nodes.join(",\n")
    )
}

#[test]
fn encoder_block_runs_without_allocating() {
    let scale = |v: Vec<f32>, s: f32| v.into_iter().map(|x| x * s).collect::<Vec<_>>();
    let mut ws = Vec::new();
    for (i, (k, b)) in [("wq", "bq"), ("wk", "bk"), ("wv", "bv"), ("wo", "bo")]
        .into_iter()
        .enumerate()
    {
        ws.push(w(k, &[HID, HID], scale(vals(HID * HID, i as u64), 0.05)));
        ws.push(w(b, &[HID], vals(HID, 10 + i as u64)));
    }
    ws.push(w("w1", &[HID, FF], scale(vals(HID * FF, 20), 0.05)));
    ws.push(w("b1", &[FF], vals(FF, 21)));
    ws.push(w("w2", &[FF, HID], scale(vals(FF * HID, 22), 0.05)));
    ws.push(w("b2", &[HID], vals(HID, 23)));
    let c = container(&block_json(), &ws);
    let p = Program::from_container(&c).unwrap_or_else(|e| panic!("{e}"));
    for (threads, batch) in [(1, 1), (1, 4), (2, 1), (2, 4)] {
        let mut ex = Executor::new(&p, 4, threads).unwrap();
        let x = vals(batch * SEQ * HID, 7);
        let mut out = vec![0.0f32; batch * SEQ * HID];
        ex.run(&x, batch, &mut out).unwrap(); // once, as a server's first request would
        ALLOCS.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            ex.run(&x, batch, &mut out).unwrap();
        }
        ARMED.store(false, Ordering::SeqCst);
        let n = ALLOCS.load(Ordering::SeqCst);
        if isa() == Isa::Portable {
            eprintln!("portable kernels: {n} allocations in 3 runs (the gemm crate's)");
        } else {
            assert_eq!(
                n, 0,
                "{n} allocations in 3 runs ({threads} threads, batch {batch})"
            );
        }
        // The output is a layer norm's: per row mean 0 and variance 1.
        for row in out.chunks_exact(HID) {
            let mean = row.iter().sum::<f32>() / HID as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / HID as f32;
            assert!(
                mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
                "{mean} {var}"
            );
        }
    }
}
