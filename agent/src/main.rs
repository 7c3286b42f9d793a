//! agentvm-agent: PID 1 of an agentvm microVM. See the library docs.

use std::sync::Arc;

use agentvm_agent::cgroup::Cgroup;
use agentvm_agent::cmdline::Options;
use agentvm_agent::reaper::Reaper;
use agentvm_agent::server::{serve, Agent};
use agentvm_agent::vsock::Listener;
use agentvm_agent::{boot, debug, info, log, power, process};

fn main() {
    if !power::is_init() {
        eprintln!("agentvm-agent: must run as PID 1 inside an agentvm VM; refusing to start");
        std::process::exit(2);
    }
    // A PID 1 that dies panics the kernel; log why and reboot (ends the VM) instead.
    std::panic::set_hook(Box::new(|p| {
        info!("panic: {p}");
        power::power_off("the agent panicked");
    }));
    let err = run();
    info!("fatal: {err}");
    power::power_off("fatal error");
}

/// Boots and serves; returns only on a fatal error.
fn run() -> Box<dyn std::error::Error> {
    let mounted = boot::mount_early();
    // Before anything is logged: an initramfs without /dev/console leaves init with no stdio.
    let console = boot::setup_console();
    if let Err(e) = mounted {
        return e.into();
    }
    if let Err(e) = console {
        return e.into();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (opts, warnings) = Options::parse(&cmdline);
    log::set_debug(opts.debug);
    for w in warnings {
        info!("{w}");
    }
    debug!("uptime {} ms, options {opts:?}", boot::uptime_ms());
    if let Err(e) = boot::loopback_up() {
        info!("{e}");
    }
    if let Err(e) = boot::set_hostname(boot::HOSTNAME) {
        info!("{e}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    let last_cap = process::caps::kernel_last_cap();
    runtime.block_on(async move {
        let reaper = match Reaper::start() {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let listener = match Listener::bind(opts.port) {
            Ok(l) => l,
            Err(e) => return format!("listen on vsock port {}: {e}", opts.port).into(),
        };
        info!("ready on vsock port {}", opts.port);
        let agent = Arc::new(Agent::new(reaper, last_cap).with_cgroup(Cgroup::system()));
        serve(listener, agent).await.into()
    })
}
