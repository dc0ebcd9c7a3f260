//! Dev-only measurement: the least time two cores of this machine need to do what one
//! worker round trip does with its tensors, with no framework, syscall or Python in
//! the way. `cargo run --release --example transfer_floor`
//!
//! Thread H (the host) copies a 64×512 f32 input into a shared mapping and raises a
//! flag; thread W (the worker) spins on the flag, copies the input into private memory,
//! copies it back out as the output, and raises its own flag; H spins on that and
//! copies the output out. Both threads spin, so no wake-up is ever paid. "evict"
//! repeats the loop with the worker's cache eviction (`Shm::evict` does the same
//! after each answer). The worker's real round trip (`benchmarks/bench_head.py`) adds
//! the socket frames, the NaN check and Python to this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const BYTES: usize = 64 * 512 * 4;
const ITERS: u64 = 20_000;

struct Shared {
    input: *mut u8,
    output: *mut u8,
    request: AtomicU64,
    answer: AtomicU64,
}

// SAFETY: the two threads touch the buffers in turn, ordered by the request/answer
// flags (release on raise, acquire on wait).
unsafe impl Sync for Shared {}

fn evict(p: *const u8, n: usize) {
    // SAFETY: p..p+n is one of our live mappings; flushing leaves the bytes unchanged.
    unsafe { ennclave_enclave::protocol::flush_lines(p, n) };
}

fn shared_mapping(n: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous shared mapping; checked for failure below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap failed");
    p.cast()
}

/// Median µs per round trip.
fn run(with_evict: bool) -> f64 {
    let sh = Shared {
        input: shared_mapping(BYTES),
        output: shared_mapping(BYTES),
        request: AtomicU64::new(0),
        answer: AtomicU64::new(0),
    };
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut times = Vec::with_capacity(ITERS as usize);
    std::thread::scope(|s| {
        let w = &sh; // the whole struct, not its raw-pointer fields (they are not Sync)
        s.spawn(move || {
            let w = w;
            let mut private = vec![0u8; BYTES];
            for i in 1..=ITERS {
                while w.request.load(Ordering::Acquire) != i {
                    std::hint::spin_loop();
                }
                // SAFETY: H does not touch the buffers until we raise `answer`.
                unsafe {
                    std::ptr::copy_nonoverlapping(w.input, private.as_mut_ptr(), BYTES);
                    std::ptr::copy_nonoverlapping(private.as_ptr(), w.output, BYTES);
                }
                w.answer.store(i, Ordering::Release);
                if with_evict {
                    evict(w.input, BYTES);
                    evict(w.output, BYTES);
                }
            }
        });
        for i in 1..=ITERS {
            let t = Instant::now();
            // SAFETY: W only reads `input` after we raise `request`, and only writes
            // `output` before it raises `answer`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), sh.input, BYTES) };
            sh.request.store(i, Ordering::Release);
            while sh.answer.load(Ordering::Acquire) != i {
                std::hint::spin_loop();
            }
            unsafe { std::ptr::copy_nonoverlapping(sh.output, dst.as_mut_ptr(), BYTES) };
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    });
    assert_eq!(dst, src);
    // SAFETY: unmapping the two mappings made above, no longer used.
    unsafe {
        libc::munmap(sh.input.cast(), BYTES);
        libc::munmap(sh.output.cast(), BYTES);
    }
    times.drain(..ITERS as usize / 10); // warm-up
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() {
    for _ in 0..3 {
        println!(
            "64×512 f32 in and out between two spinning threads: plain {:.1} µs, with eviction {:.1} µs",
            run(false),
            run(true)
        );
    }
}
