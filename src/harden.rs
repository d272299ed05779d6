//! Process hardening at start (`fieldkey serve` and `fieldkey jobs run`): no core
//! dumps, not dumpable, memory locked where the platform allows.
//!
//! Owns: the three system calls and what is reported about them. Must not: fail the
//! start because the platform refuses a lock (it is reported, and the reason logged).
//!
//! - `RLIMIT_CORE` = 0: a crash writes no core file holding unwrapped keys.
//! - `PR_SET_DUMPABLE` = 0: no core dump either, and no `ptrace` attach or
//!   `/proc/<pid>/mem` read by other processes of the same user (a compromised
//!   application container sharing the uid cannot read the sidecar's keys).
//! - `mlockall(MCL_CURRENT | MCL_FUTURE)`: no page (key material included) is written
//!   to swap. Only attempted when it cannot starve the process: with an unlimited
//!   `RLIMIT_MEMLOCK`, or with `CAP_IPC_LOCK` (which lifts the limit). With a finite
//!   limit (a container's default is a few MiB) `MCL_FUTURE` would make later
//!   allocations fail, so the process runs unlocked and says so; on Kubernetes nodes
//!   swap is normally off, which is what protects the keys there.

use std::fmt;

/// What hardening achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Core file size limit set to zero.
    pub core_dumps_off: bool,
    /// The process is not dumpable.
    pub non_dumpable: bool,
    /// Memory locked, or why not.
    pub memory_locked: Result<(), String>,
}

impl fmt::Display for Hardening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "core dumps {}, {}, memory {}",
            if self.core_dumps_off {
                "off"
            } else {
                "NOT off"
            },
            if self.non_dumpable {
                "not dumpable"
            } else {
                "DUMPABLE"
            },
            match &self.memory_locked {
                Ok(()) => "locked".to_owned(),
                Err(why) => format!("not locked ({why})"),
            }
        )
    }
}

/// Whether the effective capability set holds `CAP_IPC_LOCK` (bit 14).
#[cfg(target_os = "linux")]
fn has_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

/// Applies the hardening; never fails (see the module docs).
#[cfg(target_os = "linux")]
pub fn harden() -> Hardening {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let core_dumps_off = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .is_ok();
    let non_dumpable =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .is_ok();
    let limit = getrlimit(Resource::Memlock).current;
    let memory_locked = if limit.is_none() || has_ipc_lock() {
        rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE)
            .map_err(|e| format!("mlockall failed: {e}"))
    } else {
        Err(format!(
            "RLIMIT_MEMLOCK is {} KiB and CAP_IPC_LOCK is not held; locking all memory could make allocations fail",
            limit.unwrap_or(0) / 1024
        ))
    };
    Hardening {
        core_dumps_off,
        non_dumpable,
        memory_locked,
    }
}

/// Applies the hardening; never fails (see the module docs).
#[cfg(not(target_os = "linux"))]
pub fn harden() -> Hardening {
    Hardening {
        core_dumps_off: false,
        non_dumpable: false,
        memory_locked: Err("not supported on this platform".into()),
    }
}

/// Hardens and logs the outcome (a warning for each protection missing).
pub fn harden_and_log() -> Hardening {
    let h = harden();
    if h.core_dumps_off && h.non_dumpable && h.memory_locked.is_ok() {
        tracing::info!(hardening = %h, "process hardened");
    } else {
        tracing::warn!(hardening = %h, "process hardening incomplete");
    }
    h
}
