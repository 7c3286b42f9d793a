//! `containerd-shim-agentvm-v1`: the containerd runtime v2 shim of agentvm
//! (`io.containerd.agentvm.v1`). Every container runs in its own microVM.
//!
//! containerd runs this binary with `start` (daemonize a server, print its `unix://`
//! address), without an action (the server: `containerd.task.v2.Task` over ttrpc), or with
//! `delete` (clean up after a dead server). The shim's logic is this package's library, the
//! container logic the `agentvm` runtime library's.

use containerd_shim_agentvm_v1::{service, RUNTIME_ID};

fn main() {
    // `run` does not handle -v; containerd and users expect it (reference P18).
    if std::env::args()
        .skip(1)
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!(
            "{} ({RUNTIME_ID}) {}",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    // `delete` is answered here: containerd-shim 0.11 writes the response through tokio's
    // stdout without flushing it, so containerd read nothing and reported exit 0 for a
    // container whose shim had died.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Ok(flags) = containerd_shim::parse(&args) {
        if flags.action == "delete" {
            std::process::exit(service::delete_action(&flags));
        }
    }
    // A pod's server: its volumes are looked up in the host's mount namespace.
    if let Some(ns) = containerd_shim_agentvm_v1::mountns::take_host() {
        agentvm::pod::use_host_mounts(ns);
    }
    // One thread: QEMU is spawned with PR_SET_PDEATHSIG, which fires when the spawning
    // *thread* ends, so every VM must be spawned from the thread that lives as long as the
    // shim (see docs/decisions.md, "Tokio current-thread runtime").
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(containerd_shim::run::<service::Service>(
        RUNTIME_ID,
        Some(containerd_shim::Config {
            // The crate's SIGCHLD reaper would steal QEMU's exit status from tokio (P6);
            // our children are QEMU and its helpers, which tokio reaps.
            no_reaper: true,
            no_sub_reaper: true,
            ..Default::default()
        }),
    ));
    // Do not wait for blocking threads (a stdin fifo open may still be pending).
    std::process::exit(0);
}
