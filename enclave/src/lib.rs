//! ennclave enclave runtime.
//!
//! The library holds everything the `ennclave-enclave` worker binary needs, split so
//! that the compute path (program, exec, ops) can be tested without the sandbox:
//!
//! * `program`   — parse and validate an enclave program container (docs/enclave-program.md)
//! * `exec`      — plan buffers once, then run a program on a batch without allocating
//! * `ops`       — the kernels (GEMM-backed dense and conv, pooling, elementwise …)
//! * `team`      — the executor's spinning helper threads for the kernels' parallel loops
//! * `secmem`    — memory for decrypted secrets (memfd_secret, else mlock)
//! * `seal`      — AES-256-GCM unsealing of the program container, manifest as AAD
//! * `keys`      — ephemeral X25519 key pair and HPKE unwrapping of the data key
//! * `licence`   — key-server licences (MAC, expiry, budget) and the offline key cache
//! * `protocol`  — framed control messages with the host, shared-memory tensors
//! * `sandbox`   — non-dumpable, no core, seccomp allow-list
//! * `platform`  — native Linux or Gramine: transport, sandbox and evidence per platform
//! * `worker`    — the worker's settings, its fatal error, start-up tracing; `run`
//! * `handshake` — HELLO to READY: evidence, key and licence admission, unseal, load
//! * `serve`     — the serve loop after READY: doorbell requests and control frames
//! * `policy`    — the bundle's output policy (full, top_k, label, round) and budget
//!
//! The binary (src/main.rs) only parses its arguments, checks the inherited fds and
//! calls [`worker::run`].

pub mod exec;
pub mod handshake;
pub mod keys;
pub mod licence;
pub mod ops;
pub mod platform;
pub mod policy;
pub mod program;
pub mod protocol;
pub mod sandbox;
pub mod seal;
pub mod secmem;
pub mod serve;
pub mod team;
pub mod worker;
