//! Dev-only measurement: what evicting a dirty 64-byte line costs on this machine, with
//! `clflush` (what `Shm::evict` uses) and with `clflushopt` (weakly ordered, needs an
//! `sfence` at the end). `cargo run --release --example evict_cost`

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::arch::x86_64::{_mm_clflush, _mm_sfence};
    use std::time::Instant;
    const N: usize = 64 << 10;
    let mut buf = vec![0u8; N];
    // CPUID leaf 7, EBX bit 23: CLFLUSHOPT.
    let have_opt = std::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0;
    for round in 0..3 {
        let mut best = [f64::INFINITY; 2];
        for _ in 0..5 {
            for (k, slot) in best.iter_mut().enumerate() {
                if k == 1 && !have_opt {
                    continue;
                }
                buf.iter_mut().for_each(|b| *b = b.wrapping_add(1)); // dirty every line
                let p = buf.as_ptr();
                let t = Instant::now();
                for i in (0..N).step_by(64) {
                    // SAFETY: p + i lies inside `buf`; flushing leaves the bytes as they are.
                    unsafe {
                        if k == 0 {
                            _mm_clflush(p.add(i));
                        } else {
                            clflushopt(p.add(i));
                        }
                    }
                }
                // SAFETY: a store fence has no memory operands.
                unsafe { _mm_sfence() };
                *slot = slot.min(t.elapsed().as_nanos() as f64 / (N / 64) as f64);
            }
        }
        println!(
            "round {round}: clflush {:.1} ns a line, clflushopt {}",
            best[0],
            if have_opt {
                format!("{:.1} ns a line", best[1])
            } else {
                "not supported".into()
            }
        );
    }
}

/// Caller: `p` points into live memory and the CPU has CLFLUSHOPT.
#[cfg(target_arch = "x86_64")]
unsafe fn clflushopt(p: *const u8) {
    // SAFETY: see the caller's contract; the instruction only writes the line back and
    // invalidates it, leaving the bytes unchanged.
    unsafe { std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags)) };
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("cache-line flushing is only measured on x86-64");
}
