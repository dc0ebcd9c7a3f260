//! Read bandwidth of a 21 MB buffer (the MIT67 head's weights) summed with AVX-512
//! loads on 1 and 2 threads of the worker's thread team, by number of independent add
//! chains (accumulators), concurrent streams, and software prefetch: the measurement
//! behind the batch-1 kernels' streams (`ops::dense::gemv_panel`) and prefetches
//! (`ops::qdense::prefetch_row`).
//!
//!     cargo run --release --example stream_bandwidth
//!
//! x86-64 with AVX-512F only.

#[cfg(target_arch = "x86_64")]
fn main() {
    use ennclave_enclave::{ops::par_for, team::Team};
    if !std::arch::is_x86_feature_detected!("avx512f") {
        eprintln!("this measurement needs AVX-512F");
        return;
    }
    let n = 2048 * 2048 + 512 * 2048 + 2048 * 96;
    let w: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let sink = std::sync::atomic::AtomicU32::new(0);
    let cases = [
        (1usize, 1usize, 0usize),
        (2, 1, 0),
        (1, 2, 0),
        (1, 4, 0),
        (4, 4, 0),
        (1, 4, 2048),
    ];
    for threads in [1usize, 2] {
        let team = Team::new(threads, 200).expect("threads");
        for (chains, streams, ahead) in cases {
            let mut times = Vec::new();
            team.install(|| {
                for _ in 0..200 {
                    let t = std::time::Instant::now();
                    let part = n / threads;
                    par_for(threads, &|p| {
                        let chunk = &w[p * part..(p + 1) * part];
                        // SAFETY: AVX-512F was detected above.
                        let s = unsafe { sum(chunk, chains, streams, ahead) };
                        sink.fetch_add(s as u32 & 1, std::sync::atomic::Ordering::Relaxed);
                    });
                    times.push(t.elapsed().as_secs_f64());
                }
            });
            times.sort_by(f64::total_cmp);
            let gbs = (n * 4) as f64 / times[times.len() / 2] / 1e9;
            println!(
                "{threads} thread(s), {chains} chain(s), {streams} stream(s), \
                 prefetch {ahead:>4} B ahead: {gbs:5.1} GB/s"
            );
        }
    }
}

/// Sum of `w` read as `streams` interleaved contiguous parts into `chains` ≤ 4
/// accumulators, each load optionally preceded by a prefetch `ahead` bytes further on.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum(w: &[f32], chains: usize, streams: usize, ahead: usize) -> f32 {
    use std::arch::x86_64::*;
    let part = w.len() / streams / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut c = 0;
    for i in (0..part).step_by(16) {
        for s in 0..streams {
            let p = w[s * part + i..].as_ptr();
            if ahead > 0 {
                // A prefetch never faults, so the address may lie past the buffer.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_byte_add(ahead).cast());
            }
            // SAFETY: s * part + i + 16 <= streams * part <= w.len().
            acc[c] = _mm512_add_ps(acc[c], unsafe { _mm512_loadu_ps(p) });
            c = if c + 1 == chains { 0 } else { c + 1 };
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("this measurement is for x86-64");
}
