//! The serve loop after READY (docs/worker-protocol.md "Doorbell"): requests arrive on
//! the doorbell in the shared region (`Server::answer_posted`) or as INFER frames on
//! the control socket, next to PING and SHUTDOWN (`Server::answer_frame`); between
//! them the worker spins briefly, then sleeps on the doorbell's `events` word
//! (`wait_for_event`). Every input is copied into private memory and checked there
//! (`copy_in_checked`); the output policy and the query budget apply to every answer.

use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::handshake::Loaded;
use crate::licence;
use crate::platform::{gramine, Platform};
use crate::policy::Mode;
use crate::protocol::{
    code, doorbell, eviction_pays, futex_wait, futex_wake, write_msg, FrameReader, Msg, ProtoError,
    Shm, INFER_ALLOW_NONFINITE,
};
use crate::worker::{trace, Args, Fatal};

/// Requests up to this many bytes (each way) are evicted from the caches after the
/// answer (see `Shm::evict`), on CPUs where that pays (`eviction_pays`).
const EVICT_MAX: usize = 256 << 10;

/// Serve the loaded program until SHUTDOWN or until the host hangs up: READY, then
/// answer doorbell requests and control frames as they come.
pub fn serve(
    ctl: &mut UnixStream,
    rd: &mut FrameReader,
    shm: &Shm,
    args: &Args,
    l: Loaded,
) -> Result<(), Fatal> {
    let mut srv = Server::new(shm, args, l)?;
    let bell = Bell::open(shm)?;
    srv.ready(ctl)?;
    let mut answered = 0u32;
    loop {
        // Read `events` first: whatever the host posts after this read bumps it, so
        // the wait at the bottom cannot sleep through a request.
        let seen = bell.events.load(Ordering::Acquire);

        // A request on the doorbell (not under Gramine: requests come as frames).
        let seq = bell.req_seq.load(Ordering::Acquire);
        if args.platform == Platform::Native && seq != answered {
            answered = seq;
            srv.answer_posted(ctl, &bell, seq, args)?;
            // The host usually waits in sched_yield, off its core, behind one of our
            // threads; give that core back at once rather than after the hot spin.
            std::thread::yield_now();
            continue;
        }

        // A control frame (or an INFER frame, from hosts that do not use the doorbell).
        if rd.has_buffered() || socket_readable(ctl) {
            match srv.answer_frame(ctl, rd)? {
                ControlFlow::Continue(()) => continue,
                ControlFlow::Break(()) => return Ok(()),
            }
        }
        if args.platform == Platform::Native {
            wait_for_event(&bell, seen, answered, args);
        } else {
            // Gramine has no futex shared with the host: sleep on the socket.
            gramine::wait_readable(ctl, std::time::Duration::from_millis(args.idle_check_ms));
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Fatal {
    Fatal::new(code::INTERNAL, e.to_string())
}

fn internal_answer(e: &dyn std::fmt::Display) -> (u16, String) {
    (code::INTERNAL, e.to_string())
}

/// Send a non-fatal ERROR frame (the worker keeps serving).
fn send_error(ctl: &mut UnixStream, (code, message): (u16, String)) -> Result<(), ProtoError> {
    write_msg(
        ctl,
        &Msg::Error {
            code,
            fatal: false,
            message,
        },
    )
}

/// The doorbell block at the start of the shared region (layout in `doorbell`).
struct Bell<'a> {
    shm: &'a Shm,
    req_seq: &'a AtomicU32,
    ans_seq: &'a AtomicU32,
    events: &'a AtomicU32,
    /// `doorbell::WORKER_SLEEPS`.
    sleeps: &'a AtomicU32,
    /// `doorbell::REQ_PROGRESS`.
    in_progress: &'a AtomicU64,
    /// `doorbell::ANS_PROGRESS`.
    out_progress: &'a AtomicU64,
}

impl<'a> Bell<'a> {
    /// Zero the doorbell block (sealed-program chunks went through there) and map
    /// its words.
    fn open(shm: &'a Shm) -> Result<Bell<'a>, Fatal> {
        shm.write_bytes(0, &[0u8; doorbell::BYTES])
            .map_err(internal)?;
        let word = |offset| shm.atomic_u32(offset).map_err(internal);
        let (req_seq, ans_seq, events, sleeps) = (
            word(doorbell::REQ_SEQ)?,
            word(doorbell::ANS_SEQ)?,
            word(doorbell::EVENTS)?,
            word(doorbell::WORKER_SLEEPS)?,
        );
        Ok(Bell {
            shm,
            req_seq,
            ans_seq,
            events,
            sleeps,
            in_progress: shm.atomic_u64(doorbell::REQ_PROGRESS).map_err(internal)?,
            out_progress: shm.atomic_u64(doorbell::ANS_PROGRESS).map_err(internal)?,
        })
    }

    /// A posted request's field (`doorbell::REQ_BATCH`, `REQ_FLAGS`).
    fn field(&self, at: usize) -> Result<u32, Fatal> {
        let mut raw = [0u8; 4];
        self.shm.read_into(at, &mut raw).map_err(internal)?;
        Ok(u32::from_le_bytes(raw))
    }

    /// Post the answer to request `seq`: its fields in one copy, laid out as in
    /// `doorbell`, then the sequence number, then a wake.
    fn answer(
        &self,
        seq: u32,
        status: u32,
        batch: u32,
        out_len: usize,
        left: u64,
    ) -> Result<(), Fatal> {
        use doorbell::{ANS_BATCH, ANS_LEFT, ANS_OUT_LEN, ANS_STATUS};
        let mut ans = [0u8; ANS_LEFT + 8 - ANS_STATUS];
        let mut put = |at: usize, bytes: &[u8]| {
            ans[at - ANS_STATUS..at - ANS_STATUS + bytes.len()].copy_from_slice(bytes)
        };
        put(ANS_STATUS, &status.to_le_bytes());
        put(ANS_BATCH, &batch.to_le_bytes());
        put(ANS_OUT_LEN, &(out_len as u32).to_le_bytes());
        put(ANS_LEFT, &left.to_le_bytes());
        self.shm.write_bytes(ANS_STATUS, &ans).map_err(internal)?;
        self.ans_seq.store(seq, Ordering::Release);
        futex_wake(self.ans_seq);
        Ok(())
    }
}

/// One INFER's answer: queries left, or the error to report (the worker keeps serving).
type Answer = Result<u64, (u16, String)>;

/// Serving state after READY.
struct Server<'a> {
    shm: &'a Shm,
    l: Loaded,
    max_batch: usize,
    /// Values per output sample after the output policy.
    pout: usize,
    in_offset: usize,
    out_offset: usize,
    /// Bytes up to which a request is evicted from the caches after its answer.
    evict_max: usize,
    budget: Option<u64>,
    used: u64,
    /// The final usage report was sent: nothing more is answered under this licence.
    reported: bool,
    polbuf: Vec<f32>,
    order: Vec<usize>,
}

impl<'a> Server<'a> {
    /// Lay out the shared region for `l` (inputs after the doorbell block, outputs
    /// after the largest batch's inputs) and work out the effective query budget.
    fn new(shm: &'a Shm, args: &Args, l: Loaded) -> Result<Server<'a>, Fatal> {
        let pout = l.policy.out_len(l.out_len);
        let evict_max = if eviction_pays() { EVICT_MAX } else { 0 };
        trace(&format!(
            "cache eviction after each answer {}",
            if evict_max > 0 { "on" } else { "off" }
        ));
        trace(&format!("fp32 kernels {}", crate::ops::dense::isa().name()));
        let per_sample = (l.in_len + pout) * 4;
        let fit = shm.len().saturating_sub(doorbell::BYTES + 64) / per_sample.max(1);
        let max_batch = args.max_batch.min(fit);
        if max_batch == 0 {
            return Err(Fatal::new(
                code::BAD_REQUEST,
                format!(
                    "the shared-memory region ({} bytes) cannot hold one sample ({per_sample} bytes)",
                    shm.len()
                ),
            ));
        }
        let in_offset = doorbell::BYTES;
        let out_offset = (in_offset + max_batch * l.in_len * 4).div_ceil(64) * 64;
        // Effective budget: the tighter of the manifest's max_queries and the licence's.
        let licence_budget = l.licence.as_ref().and_then(|x| x.licence.query_budget);
        let budget = match (l.policy.max_queries, licence_budget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let out_len = l.out_len;
        Ok(Server {
            shm,
            l,
            max_batch,
            pout,
            in_offset,
            out_offset,
            evict_max,
            budget,
            used: 0,
            reported: false,
            polbuf: vec![0f32; max_batch * pout],
            order: Vec::with_capacity(out_len),
        })
    }

    /// Send READY: the batch limit, the shared region's layout and the policy in force.
    fn ready(&self, ctl: &mut UnixStream) -> Result<(), Fatal> {
        let l = &self.l;
        let mut policy = l.policy.describe();
        if let Some(lic) = l.licence.as_ref().map(|h| &h.licence) {
            policy.push_str(&format!(";licence_expires_at:{}", lic.expires_at));
            if let Some(b) = lic.query_budget {
                policy.push_str(&format!(";licence_budget:{b}"));
            }
        }
        write_msg(
            ctl,
            &Msg::Ready {
                max_batch: self.max_batch as u32,
                in_len: l.in_len as u32,
                out_len: self.pout as u32,
                in_offset: self.in_offset as u64,
                out_offset: self.out_offset as u64,
                secmem: l.secmem.clone(),
                policy,
            },
        )?;
        trace("READY sent");
        Ok(())
    }

    /// Answer the request posted on the doorbell as `seq`. Its fields are read once,
    /// here, into locals. An error message goes as a frame, before the answer points
    /// to it.
    fn answer_posted(
        &mut self,
        ctl: &mut UnixStream,
        bell: &Bell,
        seq: u32,
        args: &Args,
    ) -> Result<(), Fatal> {
        let (batch, flags) = (
            bell.field(doorbell::REQ_BATCH)?,
            bell.field(doorbell::REQ_FLAGS)?,
        );
        let posted = Posted {
            seq,
            input: bell.in_progress,
            output: bell.out_progress,
            events: bell.events,
            sleeps: bell.sleeps,
            ctl,
            args,
        };
        let (status, left) = match self.infer(batch, flags, Some(&posted)) {
            Ok(left) => (doorbell::STATUS_OK, left),
            Err(e) => {
                send_error(ctl, e)?;
                (doorbell::STATUS_ERROR, 0)
            }
        };
        bell.answer(seq, status, batch, self.pout, left)?;
        if status == doorbell::STATUS_OK {
            self.evict(batch);
        }
        Ok(())
    }

    /// Answer one frame from the control socket. `Break`: the host is done (SHUTDOWN,
    /// or it hung up).
    fn answer_frame(
        &mut self,
        ctl: &mut UnixStream,
        rd: &mut FrameReader,
    ) -> Result<ControlFlow<()>, Fatal> {
        let msg = match rd.read(ctl) {
            Err(ProtoError::Closed) => return Ok(ControlFlow::Break(())),
            r => r?,
        };
        match msg {
            Msg::Infer { batch, flags } => match self.infer(batch, flags, None) {
                Ok(queries_left) => {
                    write_msg(
                        ctl,
                        &Msg::Result {
                            batch,
                            out_len: self.pout as u32,
                            queries_left,
                        },
                    )?;
                    self.evict(batch);
                }
                Err(e) => send_error(ctl, e)?,
            },
            Msg::Ping { nonce } => write_msg(
                ctl,
                &Msg::Pong {
                    nonce,
                    queries_used: self.used,
                },
            )?,
            Msg::Shutdown => {
                // A metered licence's final usage report, then nothing more: the key
                // server credits back what the slice did not use.
                if let Some(signer) = self.l.licence.as_ref().and_then(|h| h.usage.as_ref()) {
                    let (mac, report) = signer.report(self.used);
                    self.reported = true;
                    write_msg(ctl, &Msg::Usage { report, mac })?;
                }
                write_msg(ctl, &Msg::Bye)?;
                return Ok(ControlFlow::Break(()));
            }
            other => send_error(
                ctl,
                (
                    code::PROTOCOL,
                    format!(
                        "unexpected message type 0x{:02x} after READY",
                        other.type_byte()
                    ),
                ),
            )?,
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Run one INFER whose input is at `in_offset`; on success the output is at
    /// `out_offset`. A doorbell request (`posted`) has its input read as the host
    /// announces it, and a full output written chunk by chunk, each announced.
    fn infer(&mut self, batch: u32, flags: u32, posted: Option<&Posted>) -> Answer {
        let b = batch as usize;
        self.admit(b)?;
        self.copy_in(b, flags, posted)?;
        let output = self
            .l
            .exec
            .run_in_place(b)
            .map_err(|e| (code::INTERNAL, format!("inference failed: {e}")))?;
        let (out_len, pout) = (self.l.out_len, self.pout);
        let written = if self.l.policy.mode == Mode::Full {
            match posted {
                Some(p) => write_announced(self.shm, self.out_offset, output, p),
                None => self.shm.write_f32(self.out_offset, output),
            }
        } else {
            let pol = &mut self.polbuf[..b * pout];
            for s in 0..b {
                self.l.policy.apply(
                    &output[s * out_len..(s + 1) * out_len],
                    &mut pol[s * pout..(s + 1) * pout],
                    &mut self.order,
                );
            }
            self.shm.write_f32(self.out_offset, pol)
        };
        written.map_err(|e| internal_answer(&e))?;
        self.used += b as u64;
        Ok(self.budget.map_or(u64::MAX, |m| m - self.used))
    }

    /// Whether a request of `b` samples may run: its size, the licence's expiry and
    /// the query budget.
    fn admit(&self, b: usize) -> Result<(), (u16, String)> {
        if b == 0 || b > self.max_batch {
            return Err((
                code::BAD_INPUT_SIZE,
                format!("batch of {b} samples is outside 1..={}", self.max_batch),
            ));
        }
        if self.reported {
            return Err((
                code::BUDGET_EXHAUSTED,
                "this worker has reported its usage and answers nothing more".into(),
            ));
        }
        if let Some(lic) = self.l.licence.as_ref().map(|h| &h.licence) {
            if licence::now_unix() >= lic.expires_at {
                return Err((
                    code::LICENCE_EXPIRED,
                    format!(
                        "the licence expired at {} (Unix time); restart to ask the key server for a new one",
                        lic.expires_at
                    ),
                ));
            }
        }
        if let Some(maxq) = self.budget {
            if self.used.saturating_add(b as u64) > maxq {
                let whose = if self.l.policy.max_queries == Some(maxq) {
                    "bundle's"
                } else {
                    "licence's"
                };
                return Err((
                    code::BUDGET_EXHAUSTED,
                    format!(
                        "the {whose} query budget of {maxq} samples is exhausted ({} used)",
                        self.used
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Copy the input straight into the executor's private input buffer, then
    /// validate that copy (never the shared region).
    fn copy_in(
        &mut self,
        b: usize,
        flags: u32,
        posted: Option<&Posted>,
    ) -> Result<(), (u16, String)> {
        let input = self.l.exec.input_mut(b).map_err(|e| internal_answer(&e))?;
        let check = flags & INFER_ALLOW_NONFINITE == 0;
        let in_len = self.l.in_len;
        match copy_in_checked(self.shm, self.in_offset, input, check, posted) {
            Err(e) => Err(internal_answer(&e)),
            Ok(Some(i)) => Err((
                code::NONFINITE_INPUT,
                format!(
                    "input sample {} contains NaN or infinity at position {}",
                    i / in_len,
                    i % in_len
                ),
            )),
            Ok(None) => Ok(()),
        }
    }

    /// After an answer, while the host reads it and prepares the next request: see
    /// Shm::evict (failure is impossible here, the ranges were just used). Only small
    /// requests (a larger one has mostly left this core's caches already, and flushing
    /// costs about the same per line either way), and only where it pays
    /// (`eviction_pays`).
    fn evict(&self, batch: u32) {
        let b = (batch as usize).min(self.max_batch);
        for (offset, len) in [
            (self.in_offset, b * self.l.in_len * 4),
            (self.out_offset, b * self.pout * 4),
        ] {
            if len <= self.evict_max {
                let _ = self.shm.evict(offset, len);
            }
        }
    }
}

/// Write a full output chunk by chunk, announcing each (a doorbell request).
fn write_announced(shm: &Shm, offset: usize, output: &[f32], p: &Posted) -> std::io::Result<()> {
    output
        .chunks(doorbell::PROGRESS_CHUNK)
        .enumerate()
        .try_for_each(|(k, chunk)| {
            let start = k * doorbell::PROGRESS_CHUNK;
            shm.write_f32(offset + 4 * start, chunk)?;
            p.announce_output(start + chunk.len());
            Ok(())
        })
}

/// First non-finite value in `v`. Checks blocks branch-free (vectorised) and only
/// looks for the position inside a block that has one.
fn first_nonfinite(v: &[f32]) -> Option<usize> {
    const BLOCK: usize = 256;
    const EXP: u32 = 0x7f80_0000;
    for (b, chunk) in v.chunks(BLOCK).enumerate() {
        let bad = chunk
            .iter()
            .fold(false, |acc, x| acc | (x.to_bits() & EXP == EXP));
        if bad {
            return chunk
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| b * BLOCK + i);
        }
    }
    None
}

/// Copy the input out of the shared region into private memory `dst`, one L1-sized
/// chunk at a time, and (with `check`) look for a non-finite value in each private
/// chunk while it is still in cache. Returns the index of the first non-finite value.
/// Only the private copy is ever checked: the host may rewrite the region at any time.
/// For a doorbell request (`posted`) each chunk is copied once the host says it is in
/// place.
fn copy_in_checked(
    shm: &Shm,
    offset: usize,
    dst: &mut [f32],
    check: bool,
    posted: Option<&Posted>,
) -> std::io::Result<Option<usize>> {
    const CHUNK: usize = 2048; // floats: 8 KiB
    for (c, chunk) in dst.chunks_mut(CHUNK).enumerate() {
        if let Some(p) = posted {
            if !p.wait_for_input(c * CHUNK + chunk.len()) {
                return Err(std::io::Error::other(
                    "the host sent a message before the whole input was in place",
                ));
            }
        }
        shm.read_f32(offset + c * CHUNK * 4, chunk)?;
        if check {
            if let Some(i) = first_nonfinite(chunk) {
                return Ok(Some(c * CHUNK + i));
            }
        }
    }
    Ok(None)
}

/// Whether the socket has a frame's bytes (or the host hung up): the framed read that
/// follows will not block for long. Never blocks itself; an error counts as readable,
/// so the read reports it.
fn socket_readable(sock: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv into a valid one-byte buffer on our own socket; MSG_PEEK leaves
    // the byte in the socket for the framed read, MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
}

/// Spin until `done()` or for `spin_us` µs; returns whether it got done. Waking a
/// sleeping thread costs tens of µs on a VM: a host that posts within the window
/// skips that cost.
///
/// After the first [`HOT_SPIN_US`] the spin yields its core between polls: when the
/// host shares this core (a loaded machine), a spin that never yields keeps it from
/// posting until the window is over, and every round trip took the whole window
/// (210 µs with the default 200 µs window on a loaded 2-core VM; 10–20 µs yielding).
fn spin_until(spin_us: u64, done: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    let deadline = start + std::time::Duration::from_micros(spin_us);
    let hot = start + std::time::Duration::from_micros(HOT_SPIN_US.min(spin_us));
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return done();
        }
        if now >= hot {
            std::thread::yield_now();
        }
    }
}

/// How long `spin_until` polls without yielding its core (µs).
const HOT_SPIN_US: u64 = 2;

/// Wait for the host's next message: spin until it posts a request (`req_seq` moves
/// off `answered`) or bumps `events` away from `seen`, then sleep on `events` (the
/// host rings it after every request and frame). Returns after at most
/// `idle_check_ms` even without a wake, so a host that died is noticed (its socket
/// reads as closed).
fn wait_for_event(bell: &Bell, seen: u32, answered: u32, args: &Args) {
    let posted = || {
        bell.events.load(Ordering::Acquire) != seen
            || bell.req_seq.load(Ordering::Acquire) != answered
    };
    if !spin_until(args.spin_us, posted) {
        sleep_on_events(bell.events, bell.sleeps, seen, posted, args.idle_check_ms);
    }
}

/// Sleep on `events` while it holds `seen` (at most `idle_check_ms`), unless `woken()`
/// already holds, with `WORKER_SLEEPS` raised meanwhile so the host knows to wake it.
/// The host bumps `events`, fences, then reads `WORKER_SLEEPS`; here the flag is
/// raised, fenced, then `woken()` and `events` are read: whichever order the two
/// sides run in, either the host sees the flag and wakes, or this side sees the
/// host's bump and does not sleep (FUTEX_WAIT also returns at once if `events` moved).
fn sleep_on_events(
    events: &AtomicU32,
    sleeps: &AtomicU32,
    seen: u32,
    woken: impl Fn() -> bool,
    idle_check_ms: u64,
) {
    sleeps.store(1, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    if !woken() {
        futex_wait(
            events,
            seen,
            std::time::Duration::from_millis(idle_check_ms),
        );
    }
    sleeps.store(0, Ordering::Release);
}

/// A request posted on the doorbell: its sequence number and the words through which
/// its input arrives (the host may still be copying it in) and its output is
/// announced.
struct Posted<'a> {
    seq: u32,
    /// `doorbell::REQ_PROGRESS`: how much input the host has put in place.
    input: &'a AtomicU64,
    /// `doorbell::ANS_PROGRESS`: how much output the worker has put in place.
    output: &'a AtomicU64,
    /// `doorbell::EVENTS`: rung by the host after it announces the whole input.
    events: &'a AtomicU32,
    /// `doorbell::WORKER_SLEEPS`.
    sleeps: &'a AtomicU32,
    ctl: &'a UnixStream,
    args: &'a Args,
}

impl Posted<'_> {
    /// Wait until the first `n` input floats are in place: poll, then sleep on
    /// `events`. False if the host hung up or sent a frame first (a host that posts a
    /// request owes its whole input before anything else).
    fn wait_for_input(&self, n: usize) -> bool {
        let ready = || {
            let p = self.input.load(Ordering::Acquire);
            p >> 32 == u64::from(self.seq) && (p & 0xffff_ffff) as usize >= n
        };
        if spin_until(self.args.spin_us, ready) {
            return true;
        }
        loop {
            // Read `events` before checking: a later announcement moves it.
            let seen = self.events.load(Ordering::Acquire);
            if ready() {
                return true;
            }
            if socket_readable(self.ctl) {
                return false;
            }
            sleep_on_events(
                self.events,
                self.sleeps,
                seen,
                ready,
                self.args.idle_check_ms,
            );
        }
    }

    /// The first `n` output floats are in place.
    fn announce_output(&self, n: usize) {
        self.output
            .store(u64::from(self.seq) << 32 | n as u64, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_nonfinite_finds_the_first() {
        let mut v = vec![1.0f32; 1000];
        assert_eq!(first_nonfinite(&v), None);
        assert_eq!(first_nonfinite(&[]), None);
        v[700] = f32::INFINITY;
        assert_eq!(first_nonfinite(&v), Some(700));
        v[300] = f32::NAN;
        assert_eq!(first_nonfinite(&v), Some(300));
        v[255] = f32::NEG_INFINITY;
        assert_eq!(first_nonfinite(&v), Some(255));
        assert_eq!(
            first_nonfinite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE, 0.0]),
            None
        );
    }

    #[test]
    fn spin_until_reports_done() {
        assert!(spin_until(0, || true));
        assert!(!spin_until(10, || false));
    }
}
