//! Memory for decrypted secrets (the program container plaintext and packed weights).
//!
//! Backed by `memfd_secret(2)` where the kernel offers it: such pages are removed from
//! the kernel's direct map, so not even the kernel (or a root `/proc/PID/mem` reader
//! going through it) can read them. Where `memfd_secret` is missing (older kernels,
//! `secretmem.enable=0`) we fall back to an anonymous private mapping that is
//! `mlock`ed (never swapped) and excluded from core dumps; `SecretBuf::backing`
//! reports which one was used so the host can tell the user. Contents are zeroed on
//! drop.
//!
//! Fails closed (issue #14): when neither memfd_secret nor mlock works (both are
//! charged to RLIMIT_MEMLOCK for an unprivileged user), `SecretBuf::new` refuses with
//! [`UNLOCKED_REFUSED`] unless the bundle's authenticated manifest allows unlocked
//! memory (`private.memory: "unlocked-ok"`, see `allow_unlocked`).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Set from the authenticated manifest (`private.memory: "unlocked-ok"`) before any
/// large secret is allocated; false (locked memory required) until then.
static ALLOW_UNLOCKED: AtomicBool = AtomicBool::new(false);
/// The weakest backing (`Backing::rank`) any secret buffer of this process has had.
static WEAKEST: AtomicU8 = AtomicU8::new(2);
/// The backing this worker has promised in its evidence (`commit`): no later secret
/// buffer may be weaker. 0 (anonymous allowed) until the first EVIDENCE.
static FLOOR: AtomicU8 = AtomicU8::new(0);

/// The backing that every secret buffer of this worker has had and will have, which
/// EVIDENCE reports (issue #14, item 3), and the promise to keep it: from now on a
/// buffer that would be weaker is refused. Plain memory when the owner allowed it
/// (`allow_unlocked`: a later buffer may need it), else the weaker of what the kernel
/// gives now (`probe`) and what earlier buffers got.
pub fn commit() -> std::io::Result<Backing> {
    let b = if ALLOW_UNLOCKED.load(Ordering::SeqCst) {
        Backing::Anonymous
    } else {
        let now = SecretBuf::<u8>::probe()?.rank();
        Backing::from_rank(now.min(WEAKEST.load(Ordering::SeqCst)))
    };
    FLOOR.fetch_max(b.rank(), Ordering::SeqCst);
    Ok(b)
}

/// The refusal when the worker promised memfd_secret memory (`commit`) and the kernel
/// gives it no more.
pub const SECRET_REFUSED: &str = "the enclave worker reported memfd_secret memory in its \
    evidence but the kernel gives it no more (the locked-memory limit RLIMIT_MEMLOCK is \
    too low for this program), so it refuses to unseal it; raise the limit (`ulimit -l \
    unlimited` in the shell, or `LimitMEMLOCK=infinity` in a systemd unit) or ask the \
    model owner for a bundle split with --allow-unlocked-memory";

/// Let later allocations fall back to plain, swappable memory (the owner allowed it).
pub fn allow_unlocked(yes: bool) {
    ALLOW_UNLOCKED.store(yes, Ordering::SeqCst);
}

/// The refusal, one sentence for the user (the host shows it as it is).
pub const UNLOCKED_REFUSED: &str = "the enclave worker cannot lock its secret memory \
    (memfd_secret and mlock both failed: the locked-memory limit RLIMIT_MEMLOCK is too low \
    for this program), so it refuses to unseal it; raise the limit (`ulimit -l unlimited` \
    in the shell, or `LimitMEMLOCK=infinity` in a systemd unit) or ask the model owner for \
    a bundle split with --allow-unlocked-memory";

/// What to do when memfd_secret was unavailable and `mlock` returned `locked`: the
/// backing to use, or None to refuse (unit-tested; memfd_secret cannot be switched off
/// here without root or seccomp).
fn fallback(locked: bool, allow_unlocked: bool) -> Option<Backing> {
    match (locked, allow_unlocked) {
        (true, _) => Some(Backing::Mlocked),
        (false, true) => Some(Backing::Anonymous),
        (false, false) => None,
    }
}

/// Which kernel mechanism backs a secret buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    MemfdSecret,
    Mlocked,
    /// Plain heap-like anonymous memory: mlock failed too (RLIMIT_MEMLOCK).
    Anonymous,
}

impl Backing {
    /// Stronger is larger: plain memory 0, mlock 1, memfd_secret 2.
    fn rank(self) -> u8 {
        match self {
            Backing::Anonymous => 0,
            Backing::Mlocked => 1,
            Backing::MemfdSecret => 2,
        }
    }

    fn from_rank(r: u8) -> Backing {
        match r {
            0 => Backing::Anonymous,
            1 => Backing::Mlocked,
            _ => Backing::MemfdSecret,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backing::MemfdSecret => "memfd_secret",
            Backing::Mlocked => "mlock",
            Backing::Anonymous => "anonymous",
        }
    }
}

/// Element types allowed in a secret buffer: plain old data whose all-zero bit
/// pattern is a valid value.
pub trait Pod: Copy + 'static {}
impl Pod for u8 {}
impl Pod for f32 {}

/// A fixed-size, zero-initialised buffer of `T` in secret memory.
pub struct SecretBuf<T: Pod> {
    ptr: *mut T,
    len: usize,
    map_len: usize,
    backing: Backing,
    _marker: PhantomData<T>,
}

// SAFETY: SecretBuf owns its mapping exclusively (like Vec<T>); T is plain data.
unsafe impl<T: Pod + Send> Send for SecretBuf<T> {}
// SAFETY: shared references only give &[T]; mutation needs &mut self.
unsafe impl<T: Pod + Sync> Sync for SecretBuf<T> {}

const SYS_MEMFD_SECRET: libc::c_long = 447; // same number on x86_64 and aarch64

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl<T: Pod> SecretBuf<T> {
    /// Allocate `len` zeroed elements. Tries memfd_secret, then mlock, then (only if
    /// the owner allowed it: `allow_unlocked`) plain memory; otherwise an error whose
    /// text is [`UNLOCKED_REFUSED`]; never weaker than the evidence promised (`commit`:
    /// else [`SECRET_REFUSED`]).
    pub fn new(len: usize) -> std::io::Result<Self> {
        let floor = FLOOR.load(Ordering::SeqCst);
        let allow = ALLOW_UNLOCKED.load(Ordering::SeqCst) && floor == 0;
        let b = Self::alloc(len, allow, floor)?;
        WEAKEST.fetch_min(b.backing.rank(), Ordering::SeqCst);
        Ok(b)
    }

    /// Which backing this process gets now (for HELLO and `commit`): never refuses.
    pub fn probe() -> std::io::Result<Backing> {
        Self::alloc(1, true, 0).map(|b| b.backing)
    }

    fn alloc(len: usize, allow_unlocked: bool, floor: u8) -> std::io::Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| std::io::Error::other("secret buffer size overflows"))?;
        let ps = page_size();
        let map_len = bytes.max(1).div_ceil(ps) * ps;
        if let Some(ptr) = Self::map_secret(map_len) {
            return Ok(Self::from_raw(ptr, len, map_len, Backing::MemfdSecret));
        }
        if floor >= Backing::MemfdSecret.rank() {
            return Err(std::io::Error::other(SECRET_REFUSED));
        }
        // SAFETY: anonymous private mapping, no fd, kernel chooses the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: ptr/map_len is the mapping we just created.
        let locked = unsafe {
            libc::madvise(ptr, map_len, libc::MADV_DONTDUMP);
            libc::mlock(ptr, map_len) == 0
        };
        match fallback(locked, allow_unlocked) {
            Some(backing) => Ok(Self::from_raw(ptr, len, map_len, backing)),
            None => {
                // SAFETY: unmap exactly the fresh mapping above; nothing was written.
                unsafe { libc::munmap(ptr, map_len) };
                Err(std::io::Error::other(UNLOCKED_REFUSED))
            }
        }
    }

    fn map_secret(map_len: usize) -> Option<*mut libc::c_void> {
        // SAFETY: raw syscall with a flags argument only; returns an fd or -1.
        let fd = unsafe { libc::syscall(SYS_MEMFD_SECRET, libc::O_CLOEXEC as libc::c_long) };
        if fd < 0 {
            return None;
        }
        let fd = fd as libc::c_int;
        // SAFETY: fd is a fresh memfd we own; ftruncate/mmap/close on it are sound.
        unsafe {
            if libc::ftruncate(fd, map_len as libc::off_t) != 0 {
                libc::close(fd);
                return None;
            }
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            // The mapping keeps the memory alive; the fd is no longer needed.
            libc::close(fd);
            if ptr == libc::MAP_FAILED {
                None
            } else {
                Some(ptr)
            }
        }
    }

    fn from_raw(ptr: *mut libc::c_void, len: usize, map_len: usize, backing: Backing) -> Self {
        Self {
            ptr: ptr as *mut T,
            len,
            map_len,
            backing,
            _marker: PhantomData,
        }
    }

    /// Touch every page now (rewriting one byte of each with its own value), so
    /// later accesses take no page faults.
    pub fn prefault(&mut self) {
        let ps = page_size();
        let base = self.ptr as *mut u8;
        let mut off = 0;
        while off < self.map_len {
            // SAFETY: off < map_len, inside our mapping; &mut self excludes other
            // accesses; the byte is written back unchanged.
            unsafe {
                std::ptr::write_volatile(base.add(off), std::ptr::read_volatile(base.add(off)))
            };
            off += ps;
        }
    }

    /// The start of the mapping, for code that shares the buffer between threads in
    /// disjoint parts (seal::Incoming); it stays valid until the buffer is dropped.
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr
    }

    /// Bytes mapped: `len` elements rounded up to whole pages (all of them writable).
    pub fn mapped_bytes(&self) -> usize {
        self.map_len
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl SecretBuf<u8> {
    /// The buffer viewed as floats (its first `len / 4 * 4` bytes, native endian).
    pub fn as_f32(&self) -> &[f32] {
        // SAFETY: the mapping is page-aligned (so aligned for f32) and holds len ≥
        // len/4*4 initialised bytes; every bit pattern is a valid f32; the borrow of
        // self keeps it alive and unmodified.
        unsafe { std::slice::from_raw_parts(self.ptr as *const f32, self.len / 4) }
    }
}

impl<T: Pod> std::ops::Deref for SecretBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr points to map_len >= len*size_of::<T>() bytes, page-aligned
        // (so aligned for T), zero-initialised by the kernel, valid until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Pod> std::ops::DerefMut for SecretBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Pod> Drop for SecretBuf<T> {
    fn drop(&mut self) {
        // SAFETY: we own the mapping (page-aligned, map_len a multiple of the page
        // size, so of 8). Volatile zeroing, a word at a time, so the wipe is not
        // optimised away; then unmap exactly what mmap returned.
        unsafe {
            let words = self.ptr as *mut u64;
            for i in 0..self.map_len / 8 {
                std::ptr::write_volatile(words.add(i), 0);
            }
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
            libc::munmap(self.ptr as *mut libc::c_void, self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_and_writable() {
        let mut b = SecretBuf::<f32>::new(1000).unwrap();
        assert!(b.iter().all(|&v| v == 0.0));
        b[999] = 3.5;
        assert_eq!(b[999], 3.5);
        assert_eq!(b.len(), 1000);
    }

    #[test]
    fn unlocked_memory_only_when_allowed() {
        // The decision when memfd_secret is unavailable (e.g. ENOSYS under seccomp).
        assert_eq!(fallback(true, false), Some(Backing::Mlocked));
        assert_eq!(fallback(true, true), Some(Backing::Mlocked));
        assert_eq!(fallback(false, true), Some(Backing::Anonymous));
        assert_eq!(fallback(false, false), None);
        assert!(
            UNLOCKED_REFUSED.contains("ulimit -l") && UNLOCKED_REFUSED.contains("LimitMEMLOCK")
        );
    }

    #[test]
    fn ranks_order_the_backings() {
        for b in [Backing::Anonymous, Backing::Mlocked, Backing::MemfdSecret] {
            assert_eq!(Backing::from_rank(b.rank()), b);
        }
        assert!(Backing::Anonymous.rank() < Backing::Mlocked.rank());
        assert!(Backing::Mlocked.rank() < Backing::MemfdSecret.rank());
    }

    #[test]
    fn empty_is_fine() {
        let b = SecretBuf::<u8>::new(0).unwrap();
        assert!(b.is_empty());
    }
}
