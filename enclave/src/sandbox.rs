//! Process hardening for the worker.
//!
//! [`harden_process`] runs first thing in `main`, before any secret exists:
//!
//! * `PR_SET_DUMPABLE 0` — `/proc/PID/mem`, `process_vm_readv` and `ptrace` from other
//!   processes of the same (non-root) user are refused, and no core dump is written;
//! * `RLIMIT_CORE 0` — belt and braces for core dumps;
//! * `PR_SET_NO_NEW_PRIVS 1` — required for an unprivileged seccomp filter, and no
//!   set-uid gain through exec (exec is forbidden anyway).
//!
//! [`install_seccomp`] runs after the program is unsealed and the executor (and its
//! thread pool) exists, before the first INFER request. It installs, on **all
//! threads** (`SECCOMP_FILTER_FLAG_TSYNC`; threads created later inherit it):
//!
//! 1. a deny-list that **kills the process** on syscalls that only an attacker would
//!    make: exec, ptrace, process_vm_*, socket/connect, fork, bpf, module loading, …;
//! 2. an allow-list of what inference, frame I/O and the thread pool need; everything
//!    else fails with `EPERM` (so e.g. `openat` gets EPERM, the worker survives);
//! 3. `clone3` fails with `ENOSYS` so glibc falls back to `clone`, whose flags (unlike
//!    clone3's struct) the filter can inspect: only `CLONE_THREAD` clones are allowed.
//!
//! `mmap`/`mprotect` with `PROT_EXEC` are refused, so no new code can be mapped.
//!
//! Setting `ENNCLAVE_SECCOMP_LOG=1` in the worker's environment turns action 2 into
//! "log" (visible in the audit log / dmesg) to find syscalls a platform needs.

// `libc::SYS_*` are `c_long`: i64 on the 64-bit targets we build for, so the `as i64`
// casts are no-ops there but keep the code correct where `c_long` is 32 bits.
#![allow(clippy::unnecessary_cast)]

use seccompiler::{
    apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen as Len,
    SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::io;

/// Refuse to run with a dynamic-loader variable in the environment (issue #14): any
/// `LD_*` (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, LD_DEBUG, …) can load or trace code
/// inside this process. The host passes none (runtime/worker.py `_WORKER_ENV`), so one
/// here means someone else started the worker. (Preloaded code has already run by
/// now; the check makes sure it gets no key — and `check_mappings` catches a library
/// that removed its variable again.) `allowed`: names set by a measured manifest
/// (Gramine's `loader.env.LD_LIBRARY_PATH`: Gramine passes no host variables, and the
/// libraries it loads are trusted files hashed in its manifest).
pub fn check_environment<I, K>(vars: I, allowed: &[&str]) -> Result<(), String>
where
    I: IntoIterator<Item = K>,
    K: AsRef<std::ffi::OsStr>,
{
    for k in vars {
        let k = k.as_ref().to_string_lossy();
        if k.starts_with("LD_") && !allowed.contains(&k.as_ref()) {
            return Err(format!(
                "the enclave worker refuses to run with {k} in its environment (a dynamic-loader \
                 variable that can put foreign code into it); start it through ennclave, which \
                 passes no such variable"
            ));
        }
    }
    Ok(())
}

/// The only shared objects a dynamically linked worker links (`ldd`): the C library,
/// libm, libgcc_s (unwinding) and the dynamic loader itself. They must come from the
/// system library directories (LD_LIBRARY_PATH could supply a look-alike elsewhere). A
/// statically linked worker (the default build, `-C target-feature=+crt-static`) links
/// none, so any shared object mapped into it is foreign.
const DYNAMIC_LIBS: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
];
const SYSTEM_LIB_DIRS: &[&str] = &["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"];

/// Refuse if any *executable* mapping in `maps` (the text of /proc/self/maps) is
/// something other than this binary (`exe`), an allowed system library, `[vdso]` or
/// `[vsyscall]`: a preloaded or audit library, or code copied into anonymous memory.
/// Non-executable mappings (data, the shared memfd, locale files) are not code.
/// `static_binary`: the worker was linked statically (main.rs knows: the flag that
/// makes it so reaches only the binary crate), so no shared object at all is allowed.
pub fn check_mappings(maps: &str, exe: &str, static_binary: bool) -> Result<(), String> {
    let allowed_libs: &[&str] = if static_binary { &[] } else { DYNAMIC_LIBS };
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let perms = f.nth(1).unwrap_or("");
        if !perms.contains('x') {
            continue;
        }
        // address perms offset dev inode [path…]; a path may contain spaces.
        let path = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        let path = path.trim_end_matches(" (deleted)");
        let ok = path == exe
            || path == "[vdso]"
            || path == "[vsyscall]"
            || (SYSTEM_LIB_DIRS.iter().any(|d| path.starts_with(d))
                && !path.contains("/../")
                && path
                    .rsplit('/')
                    .next()
                    .is_some_and(|name| allowed_libs.contains(&name)));
        if !ok {
            let what = if path.is_empty() {
                "anonymous memory"
            } else {
                path
            };
            let expected = if static_binary {
                "only its own, statically linked binary is expected"
            } else {
                "only its own binary and the system's libc, libm, libgcc_s and dynamic loader \
                 are expected"
            };
            return Err(format!(
                "the enclave worker refuses to run with foreign code mapped into it ({what}; \
                 {expected}); start it through ennclave without LD_PRELOAD or LD_AUDIT"
            ));
        }
    }
    Ok(())
}

/// This process's tracer from /proc/self/status (`TracerPid:`); None if the field is
/// missing.
pub fn tracer_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Refuse while a tracer is attached (issue #14): PR_SET_DUMPABLE 0 does not detach a
/// tracer that attached before it (e.g. one that started the worker with
/// PTRACE_TRACEME), and a tracer can read and rewrite everything. `field_required`:
/// a missing TracerPid (or an unreadable file) is refused too (native Linux always has
/// it; Gramine's /proc may not). Ok(true): TracerPid was read and is 0; Ok(false): it
/// could not be read (allowed here), so nothing was checked.
pub fn check_no_tracer(field_required: bool) -> Result<bool, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match tracer_pid(&status) {
        Some(0) => Ok(true),
        None if !field_required => Ok(false),
        Some(pid) => Err(format!(
            "the enclave worker refuses to run while process {pid} traces it (ptrace); start \
             it through ennclave, not under a debugger or tracer"
        )),
        None => Err(
            "the enclave worker cannot read its TracerPid from /proc/self/status, so \
                     it cannot tell whether it is traced; it refuses to run"
                .into(),
        ),
    }
}

/// What the start-up checks did (main.rs), for the protections the worker reports in
/// its evidence (handshake.rs `protections`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StartupChecks {
    /// `check_environment` passed.
    pub environment: bool,
    /// `check_mappings` passed (native only).
    pub mappings: bool,
    /// `check_no_tracer` read TracerPid 0 (and so will every later check).
    pub tracer: bool,
    /// `harden_process` ran (native only).
    pub non_dumpable: bool,
    /// The binary is linked statically: no dynamic loader ran in it.
    pub static_binary: bool,
}

static STARTUP: std::sync::OnceLock<StartupChecks> = std::sync::OnceLock::new();

/// Record the start-up checks (once, in main.rs, before HELLO).
pub fn record_startup(c: StartupChecks) {
    let _ = STARTUP.set(c);
}

/// The start-up checks recorded by `record_startup` (none done until then).
pub fn startup() -> StartupChecks {
    STARTUP.get().copied().unwrap_or_default()
}

/// Non-dumpable, no core files, no new privileges.
pub fn harden_process() -> io::Result<()> {
    // SAFETY: prctl/setrlimit with integer arguments and a pointer to a local struct.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn arch() -> io::Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| io::Error::other("seccomp: unsupported architecture"))
}

fn sc(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("seccomp: {e}"))
}

/// Syscalls that kill the worker outright.
fn kill_list() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_pidfd_getfd,
        libc::SYS_pidfd_open,
        libc::SYS_process_madvise,
        libc::SYS_personality,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_fork, libc::SYS_vfork]);
    v.into_iter().map(|x| x as i64).collect()
}

fn no_exec(arg: u8) -> Result<SeccompRule, seccompiler::Error> {
    // (arg & PROT_EXEC) == 0
    SeccompRule::new(vec![Cond::new(
        arg,
        Len::Qword,
        Op::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])
    .map_err(Into::into)
}

/// Syscalls the worker may make once serving, with argument conditions where cheap.
fn allow_list() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let plain = [
        // frame I/O on the inherited socket, diagnostics on stderr
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_close,
        // memory (malloc, thread stacks); PROT_EXEC refused below
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mlock,
        libc::SYS_munlock,
        // threads: futex wait/wake, yield, sleeping, thread start-up and exit
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill, // abort() on panic=abort
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_clone3, // answered ENOSYS by the third filter
    ];
    for s in plain {
        m.insert(s as i64, vec![]);
    }
    m.insert(libc::SYS_mmap as i64, vec![no_exec(2)?]);
    m.insert(libc::SYS_mprotect as i64, vec![no_exec(2)?]);
    // Only threads: CLONE_THREAD must be set (no fork through clone).
    m.insert(
        libc::SYS_clone as i64,
        vec![SeccompRule::new(vec![Cond::new(
            0,
            Len::Qword,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // A team helper moving itself off the owner's core (`team::move_off`): the
    // calling thread only (pid 0), no other process's.
    m.insert(
        libc::SYS_sched_setaffinity as i64,
        vec![SeccompRule::new(vec![Cond::new(
            0,
            Len::Qword,
            Op::Eq,
            0,
        )?])?],
    );
    // Thread naming only.
    m.insert(
        libc::SYS_prctl as i64,
        vec![SeccompRule::new(vec![Cond::new(
            0,
            Len::Dword,
            Op::Eq,
            libc::PR_SET_NAME as u64,
        )?])?],
    );
    Ok(m)
}

fn compile(f: SeccompFilter) -> io::Result<BpfProgram> {
    f.try_into().map_err(sc)
}

/// Install the three filters on all threads. Irreversible.
pub fn install_seccomp() -> io::Result<()> {
    let arch = arch()?;
    let log = std::env::var_os("ENNCLAVE_SECCOMP_LOG").is_some_and(|v| v == "1");

    let kill: BTreeMap<i64, Vec<SeccompRule>> =
        kill_list().into_iter().map(|s| (s, vec![])).collect();
    let deny = compile(
        SeccompFilter::new(kill, SeccompAction::Allow, SeccompAction::KillProcess, arch)
            .map_err(sc)?,
    )?;
    let mismatch = if log {
        SeccompAction::Log
    } else {
        SeccompAction::Errno(libc::EPERM as u32)
    };
    let allow = compile(
        SeccompFilter::new(
            allow_list().map_err(sc)?,
            mismatch,
            SeccompAction::Allow,
            arch,
        )
        .map_err(sc)?,
    )?;
    let clone3: BTreeMap<i64, Vec<SeccompRule>> =
        [(libc::SYS_clone3 as i64, vec![])].into_iter().collect();
    let clone3 = compile(
        SeccompFilter::new(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(sc)?,
    )?;
    // The allow-list goes last: once it is on, neither prctl(NO_NEW_PRIVS) (which
    // seccompiler calls before each install) nor seccomp() itself is permitted.
    for p in [&clone3, &deny, &allow] {
        apply_filter_all_threads(p).map_err(sc)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn loader_variables_are_refused() {
        assert!(check_environment(["PATH", "ENNCLAVE_TRACE", "HOME"], &[]).is_ok());
        for v in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "LD_DEBUG",
            "LD_BIND_NOW",
        ] {
            let e = check_environment(["PATH", v], &[]).unwrap_err();
            assert!(e.contains(v), "{e}");
        }
        let gramine = ["LD_LIBRARY_PATH"];
        assert!(check_environment(["LD_LIBRARY_PATH"], &gramine).is_ok());
        assert!(check_environment(["LD_LIBRARY_PATH", "LD_PRELOAD"], &gramine).is_err());
    }

    #[test]
    fn only_expected_code_is_mapped() {
        let exe = "/opt/x/ennclave-enclave";
        let good = "\
55dc4db8f000-55dc4db94000 r-xp 00002000 fe:00 1 /opt/x/ennclave-enclave
55dc4db94000-55dc4db95000 rw-p 00002000 fe:00 1 /opt/x/ennclave-enclave
7f35df331000-7f35df487000 r-xp 00026000 fe:00 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f35df331000-7f35df487000 r-xp 00026000 fe:00 2 /lib/x86_64-linux-gnu/libgcc_s.so.1
7f35df000000-7f35df100000 rw-s 00000000 00:01 3 /memfd:ennclave-shm (deleted)
7f35df4fe000-7f35df500000 r-xp 00000000 00:00 0 [vdso]
7f35df501000-7f35df527000 r-xp 00001000 fe:00 4 /lib64/ld-linux-x86-64.so.2
7f35df600000-7f35df601000 rw-p 00000000 00:00 0
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
";
        check_mappings(good, exe, false).unwrap();
        // A static worker maps no shared object: the same C library is foreign there.
        assert!(check_mappings(good, exe, true).is_err());
        let own = good
            .lines()
            .filter(|l| !l.contains(".so"))
            .collect::<Vec<_>>()
            .join("\n");
        check_mappings(&own, exe, true).unwrap();
        for bad in [
            "7f0000000000-7f0000001000 r-xp 00000000 fe:00 9 /tmp/evil.so",
            "7f0000000000-7f0000001000 r-xp 00000000 fe:00 9 /tmp/libc.so.6",
            "7f0000000000-7f0000001000 r-xp 00000000 fe:00 9 /usr/lib/x86_64-linux-gnu/libz.so.1",
            "7f0000000000-7f0000001000 rwxp 00000000 00:00 0",
        ] {
            assert!(
                check_mappings(&format!("{good}{bad}\n"), exe, false).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tracer_pid_is_read() {
        assert_eq!(tracer_pid("Name:\tx\nTracerPid:\t0\nUid:\t0\n"), Some(0));
        assert_eq!(tracer_pid("Name:\tx\nTracerPid:\t4242\n"), Some(4242));
        assert_eq!(tracer_pid("Name:\tx\n"), None);
        // This test process is not traced (unless run under a debugger).
        if tracer_pid(&std::fs::read_to_string("/proc/self/status").unwrap()) == Some(0) {
            assert!(check_no_tracer(true).unwrap());
            assert!(check_no_tracer(false).unwrap());
        }
    }

    use super::*;

    #[test]
    fn filters_compile() {
        let arch = arch().unwrap();
        let m = allow_list().unwrap();
        assert!(m.contains_key(&(libc::SYS_futex as i64)));
        assert!(!m.contains_key(&(libc::SYS_openat as i64)));
        for s in kill_list() {
            assert!(!m.contains_key(&s), "syscall {s} both allowed and killed");
        }
        compile(
            SeccompFilter::new(m, SeccompAction::Errno(1), SeccompAction::Allow, arch).unwrap(),
        )
        .unwrap();
    }

    /// Under the filters open is refused, threads work, and a thread may set its own
    /// CPU affinity but not another process's. Run in a forked child so the filters do
    /// not affect the test harness.
    #[test]
    fn sandbox_blocks_open_and_allows_threads() {
        // SAFETY: fork in a test; the child only makes async-signal-safe-enough calls
        // (the test harness is multi-threaded, but the child touches no locks we hold
        // except the allocator, which is fine for glibc after fork).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                // SAFETY: getppid has no arguments (before the filters, which refuse it).
                let parent = unsafe { libc::getppid() };
                if harden_process().is_err() {
                    return Some(20);
                }
                if let Err(e) = install_seccomp() {
                    eprintln!("{e}");
                    return Some(21);
                }
                // open is refused with EPERM
                if std::fs::File::open("/etc/hostname").is_ok() {
                    return Some(10);
                }
                // threads still work, and can compute
                let h = match std::thread::Builder::new()
                    .name("t".into())
                    .spawn(|| (0..1000u64).sum::<u64>())
                {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("{e}");
                        return Some(22);
                    }
                };
                if h.join().ok()? != 499500 {
                    return Some(11);
                }
                let v: Vec<f32> = vec![1.0; 1 << 22]; // large malloc → mmap
                if v.iter().sum::<f32>() <= 0.0 {
                    return Some(12);
                }
                // A thread may set its own affinity (`team::move_off`), not another
                // process's (the parent's, its own mask: allowed without the filter).
                // SAFETY: a plain bit set on our stack, passed with its size.
                unsafe {
                    let size = std::mem::size_of::<libc::cpu_set_t>();
                    let mut m: libc::cpu_set_t = std::mem::zeroed();
                    if libc::sched_getaffinity(0, size, &mut m) != 0 {
                        return Some(14);
                    }
                    if libc::sched_setaffinity(0, size, &m) != 0 {
                        return Some(15);
                    }
                    let other = libc::sched_setaffinity(parent, size, &m);
                    if other != -1 || *libc::__errno_location() != libc::EPERM {
                        return Some(16);
                    }
                }
                Some(0)
            })()
            .unwrap_or(13);
            // SAFETY: terminate the forked child immediately.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child died: status {status}");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
