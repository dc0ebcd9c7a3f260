//! A team of spinning threads for the executor's parallel loops.
//!
//! Every layer of a program is one parallel loop (`ops::par_for`), and at small batch
//! sizes a layer takes tens of µs. With rayon's pool the second thread went to sleep
//! between layers and between requests, and waking a sleeping thread costs tens of µs
//! on a VM: the MIT67 head at batch 1 ran 1.48× faster on two threads than on one,
//! against ONNX Runtime's 1.84× (its pool spins between runs). A team's helpers spin
//! on a job counter for `spin_us` after their last job (yielding their core after the
//! first few µs, so a loaded machine's other processes still run), then sleep on a
//! condition variable until the next job.
//!
//! One thread at a time owns the team (the executor's, inside [`Team::install`]); a
//! loop started while the team is busy (a nested loop, or from a helper) runs on the
//! calling thread alone.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a helper polls without yielding its core (µs), as the serve loop does.
const HOT_SPIN_US: u64 = 2;
/// A helper that joins this many jobs in a row on the owner's core moves off it (see
/// [`move_off`]).
const SHARED_CORE_JOBS: u32 = 8;

/// One parallel loop: `f(i)` for `i in 0..n`, indices handed out by `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    /// Indices not yet finished; the owner returns when it reaches 0.
    left: AtomicUsize,
}

impl Job<'_> {
    /// Take and run indices until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // Counted as finished even if f(i) unwinds (tests; release builds
            // abort on panic), so the owner never waits for it forever.
            let _done = Done(&self.left);
            (self.f)(i);
        }
    }
}

/// Decrements a job's `left` when dropped. Release: the owner's Acquire load of 0
/// sees every write the finished calls made.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

struct Shared {
    /// The current job (a `Job` on the owner's stack), or null between jobs.
    job: AtomicPtr<Job<'static>>,
    /// Bumped for every job, so an idle helper notices a new one.
    epoch: AtomicU64,
    /// Helpers that have loaded `job` and may still use it.
    active: AtomicUsize,
    /// Held by the thread that runs a job; others run their loops alone.
    busy: AtomicBool,
    stop: AtomicBool,
    /// Set when a call on a helper panicked (tests only: release builds abort).
    panicked: AtomicBool,
    spin_us: AtomicU64,
    /// The core the owner ran on when it published the last job (-1: unknown).
    owner_cpu: AtomicI32,
    /// Helpers asleep (changed under `lock`).
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The executor's helper threads (`threads - 1` of them: the owner is the first).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

thread_local! {
    /// The team this thread owns inside [`Team::install`], null elsewhere.
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is one of a team's helpers.
    static HELPER: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// A team of `threads` (the caller plus `threads - 1` helpers) whose helpers spin
    /// for `spin_us` after each job.
    pub fn new(threads: usize, spin_us: u64) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            spin_us: AtomicU64::new(spin_us),
            owner_cpu: AtomicI32::new(-1),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut team = Team {
            shared,
            helpers: Vec::new(),
        };
        for i in 1..threads.max(1) {
            let s = team.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("enclave-team-{i}"))
                .spawn(move || helper(&s))?;
            team.helpers.push(h);
        }
        Ok(team)
    }

    pub fn set_spin_us(&self, spin_us: u64) {
        self.shared.spin_us.store(spin_us, Ordering::Relaxed);
    }

    /// Run `f` with this team serving the calling thread's [`par_for`](crate::ops::par_for) loops.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Team);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self as *const Team)));
        f()
    }

    /// `f(i)` for `i in 0..n` on the team; returns when every call has returned.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        if self.helpers.is_empty() || n < 2 || s.busy.swap(true, Ordering::Acquire) {
            (0..n).for_each(f);
            return;
        }
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
            left: AtomicUsize::new(n),
        };
        // The lifetime is erased for the shared pointer only: helpers use the job
        // between their `active` increment and decrement, and we wait for `active`
        // to reach 0 after unpublishing it, before `job` goes out of scope.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        s.owner_cpu.store(current_cpu(), Ordering::Relaxed);
        s.job.store(ptr, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this wake after a helper's check of `epoch`
            // (made under the lock before it waits), so none sleeps through the job.
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // Unpublishes the job on every way out, unwinding included: a helper that
        // incremented `active` before the store may still hold the pointer (it finds
        // no index left, or finishes the ones the owner's panic left); one that
        // increments later sees null. So `job` outlives every use.
        struct Unpublish<'a>(&'a Shared);
        impl Drop for Unpublish<'_> {
            fn drop(&mut self) {
                self.0.job.store(std::ptr::null_mut(), Ordering::SeqCst);
                while self.0.active.load(Ordering::SeqCst) != 0 {
                    std::hint::spin_loop();
                }
                self.0.busy.store(false, Ordering::Release);
            }
        }
        let unpublish = Unpublish(s);
        job.work();
        while job.left.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        drop(unpublish);
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a parallel task panicked on a team helper");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A helper's life: wait for a new epoch (spinning, then asleep), join its job.
fn helper(s: &Shared) {
    HELPER.with(|h| h.set(true));
    let mut seen = s.epoch.load(Ordering::SeqCst);
    // Jobs joined in a row on the owner's core; None once a move did not take (a
    // platform that refuses it, or reports one core for every thread).
    let mut shared_core = Some(0u32);
    while !s.stop.load(Ordering::SeqCst) {
        let epoch = wait_for_epoch(s, seen);
        if epoch == seen {
            continue; // stop, or a spurious wake-up
        }
        seen = epoch;
        s.active.fetch_add(1, Ordering::SeqCst);
        let ptr = s.job.load(Ordering::SeqCst);
        if !ptr.is_null() {
            // SAFETY: a non-null `job` is a live Job on its owner's stack: the owner
            // unpublishes it and then waits for `active` to drop to 0 before the Job
            // goes out of scope, and our increment above came before our load (both
            // SeqCst), so the owner sees it. The job may be a later one than `epoch`
            // announced; working on it is just as valid.
            let job = unsafe { &*ptr };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.work())).is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
        if let Some(n) = shared_core.as_mut() {
            let owner = s.owner_cpu.load(Ordering::Relaxed);
            if owner >= 0 && current_cpu() == owner {
                *n += 1;
                if *n >= SHARED_CORE_JOBS {
                    *n = 0;
                    move_off(owner);
                    if current_cpu() == owner {
                        shared_core = None;
                    }
                }
            } else {
                *n = 0;
            }
        }
    }
}

/// Spin for `spin_us` until `epoch` moves off `seen`, then sleep until it does (or the
/// team stops). Returns the epoch seen last.
fn wait_for_epoch(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let spin = Duration::from_micros(s.spin_us.load(Ordering::Relaxed));
    let hot = Duration::from_micros(HOT_SPIN_US);
    loop {
        for _ in 0..64 {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                return e;
            }
            std::hint::spin_loop();
        }
        let waited = start.elapsed();
        if waited >= spin || s.stop.load(Ordering::Relaxed) {
            break;
        }
        if waited >= hot {
            std::thread::yield_now();
        }
    }
    let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut e = s.epoch.load(Ordering::SeqCst);
    while e == seen && !s.stop.load(Ordering::SeqCst) {
        g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        e = s.epoch.load(Ordering::SeqCst);
    }
    s.sleepers.fetch_sub(1, Ordering::SeqCst);
    e
}

/// The core the calling thread runs on, or -1 where that is unknown (glibc reads it
/// from the thread's rseq area or the vDSO: no system call).
fn current_cpu() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
        unsafe { libc::sched_getcpu() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        -1
    }
}

/// Move the calling helper off core `cpu`, where the owner runs, and leave it free to
/// go anywhere again. A helper sharing the owner's core adds nothing, and on a machine
/// with as many cores as threads plus a polling host (3 runnable threads on 2 cores)
/// the scheduler may keep it there for seconds: the image model's CNN at batch 2 ran
/// at one-thread speed, 0.21–0.23 instead of 0.155 ms per call, in such spells. Leaving
/// the affinity mask without `cpu` migrates the thread at once; restoring it keeps the
/// scheduler's freedom (no pinning). Failures (a sandbox or a platform without it)
/// leave the thread where it is.
fn move_off(cpu: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: the cpu_set_t values are plain bit sets on our stack, passed with their
    // size; pid 0 is the calling thread.
    unsafe {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let mut all: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut all) != 0 {
            return;
        }
        let mut others = all;
        libc::CPU_CLR(cpu as usize, &mut others);
        if libc::CPU_COUNT(&others) == 0 || libc::sched_setaffinity(0, size, &others) != 0 {
            return;
        }
        libc::sched_setaffinity(0, size, &all);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// `f(i)` for `i in 0..n` on the team the calling thread owns (see [`Team::install`]);
/// `None` when it owns none. On a helper thread, nested loops run serially (`Some`).
pub fn run_on_current(n: usize, f: &(dyn Fn(usize) + Sync)) -> Option<()> {
    if HELPER.with(|h| h.get()) {
        (0..n).for_each(f);
        return Some(());
    }
    let team = CURRENT.with(|c| c.get());
    if team.is_null() {
        return None;
    }
    // SAFETY: CURRENT is only non-null inside `Team::install`, which borrows the team
    // for its whole duration and restores the previous value before returning.
    unsafe { (*team).run(n, f) };
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_once_across_many_jobs() {
        let team = Team::new(3, 50).unwrap();
        let counts: Vec<AtomicU32> = (0..97).map(|_| AtomicU32::new(0)).collect();
        team.install(|| {
            for _ in 0..500 {
                run_on_current(97, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
            }
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 500));
    }

    #[test]
    fn helpers_take_part_and_wake_from_sleep() {
        let team = Team::new(2, 0).unwrap(); // no spinning: every job wakes a sleeper
        let threads = Mutex::new(std::collections::HashSet::new());
        team.install(|| {
            for _ in 0..200 {
                std::thread::sleep(Duration::from_micros(50));
                run_on_current(64, &|_| {
                    std::thread::sleep(Duration::from_micros(20));
                    threads.lock().unwrap().insert(std::thread::current().id());
                })
                .unwrap();
            }
        });
        assert_eq!(threads.lock().unwrap().len(), 2);
    }

    /// `move_off` takes the thread off its core and gives the mask back unchanged (on
    /// one allowed core it does nothing).
    #[cfg(target_os = "linux")]
    #[test]
    fn move_off_leaves_the_core_and_restores_the_mask() {
        // SAFETY: plain bit sets on our stack, with their size; pid 0 is this thread.
        let mask = || unsafe {
            let mut m: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of_val(&m), &mut m),
                0
            );
            m
        };
        let before = mask();
        // SAFETY: as above.
        let allowed = unsafe { libc::CPU_COUNT(&before) };
        let cpu = current_cpu();
        assert!(cpu >= 0);
        move_off(cpu);
        if allowed > 1 {
            assert_ne!(current_cpu(), cpu, "still on core {cpu}");
        }
        let after = mask();
        // SAFETY: as above.
        let same = (0..libc::CPU_SETSIZE as usize)
            .all(|c| unsafe { libc::CPU_ISSET(c, &before) == libc::CPU_ISSET(c, &after) });
        assert!(same, "the affinity mask changed");
    }

    #[test]
    fn nested_loops_and_no_team_fall_back() {
        assert!(run_on_current(4, &|_| {}).is_none());
        let team = Team::new(2, 100).unwrap();
        let total = AtomicU32::new(0);
        team.install(|| {
            run_on_current(8, &|_| {
                run_on_current(8, &|_| {
                    total.fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
            })
            .unwrap();
        });
        assert_eq!(total.load(Ordering::Relaxed), 64);
        assert!(run_on_current(4, &|_| {}).is_none(), "install restores");
    }
}
