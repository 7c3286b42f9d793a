//! A fake VMM backend for tests: each "VM" is the real guest agent's server
//! (`agentvm_agent::sim`) on a thread of the test process, reached over socketpairs, so the
//! sandbox, container and pod logic (and the shim above them) run against the agent's real
//! protocol handling without a VM. The agent's simulated machine runs processes as plain
//! children of the test, on the host's filesystem, without namespaces or privilege changes;
//! its module docs list exactly what is simulated.
//!
//! Backend-specific parts are faked here: there is no VMM process ([`VmHandle::pids`] is
//! empty), pause and resume only count, and the diagnostics name the fake.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_agent::sim::SimVm;

use crate::error::{Error, Result};
use crate::guest::{DialFuture, Dialer};
use crate::vmm::{AgentIo, BoxFuture, VmConfig, VmHandle, VmmBackend};

/// The fake backend; it counts its launches (a pod's later containers must not launch one).
#[derive(Debug, Default)]
pub struct FakeVmm {
    launches: AtomicUsize,
    vms: Mutex<Vec<Arc<FakeVm>>>,
}

impl FakeVmm {
    /// How many VMs it launched.
    pub fn launches(&self) -> usize {
        self.launches.load(Ordering::SeqCst)
    }

    /// The VMs it launched, oldest first.
    pub fn vms(&self) -> Vec<Arc<FakeVm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl VmmBackend for FakeVmm {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn launch<'a>(&'a self, _cfg: &'a VmConfig) -> BoxFuture<'a, Result<Box<dyn VmHandle>>> {
        Box::pin(async move {
            self.launches.fetch_add(1, Ordering::SeqCst);
            let sim = SimVm::start().map_err(|e| Error::Spawn {
                program: "the simulated agent".into(),
                source: e,
            })?;
            let vm = Arc::new(FakeVm {
                sim: Arc::new(sim),
                paused: AtomicBool::new(false),
                pauses: AtomicUsize::new(0),
            });
            self.vms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::clone(&vm));
            Ok(Box::new(Handle(vm)) as Box<dyn VmHandle>)
        })
    }
}

/// One fake VM.
#[derive(Debug)]
pub struct FakeVm {
    sim: Arc<SimVm>,
    paused: AtomicBool,
    pauses: AtomicUsize,
}

impl FakeVm {
    /// Pids of the processes running "in" the VM (children of the test process).
    pub fn live_pids(&self) -> Vec<i32> {
        self.sim.machine().live_pids()
    }

    /// How the VM ended (its agent powered off, or it was killed), once it has.
    pub fn ended(&self) -> Option<String> {
        self.sim.ended().borrow().clone()
    }

    /// Whether the VM is paused, and how many times it was paused.
    pub fn paused(&self) -> (bool, usize) {
        (
            self.paused.load(Ordering::SeqCst),
            self.pauses.load(Ordering::SeqCst),
        )
    }
}

/// The handle the sandbox owns; dropping it ends the VM.
#[derive(Debug)]
struct Handle(Arc<FakeVm>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0
            .sim
            .machine()
            .pull_the_plug("the VM handle was dropped");
    }
}

#[derive(Debug)]
struct SimDialer(Arc<SimVm>);

impl Dialer for SimDialer {
    fn dial(&self) -> DialFuture<'_> {
        Box::pin(async move {
            let s = self.0.connect()?;
            s.set_nonblocking(true)?;
            let s = tokio::net::UnixStream::from_std(s)?;
            Ok(Box::new(s) as Box<dyn AgentIo>)
        })
    }
}

impl VmHandle for Handle {
    fn dialer(&self) -> Arc<dyn Dialer> {
        Arc::new(SimDialer(Arc::clone(&self.0.sim)))
    }

    fn agent_listening(&self) -> bool {
        true
    }

    fn exited(&self) -> Option<String> {
        self.0.ended()
    }

    fn wait(&self) -> BoxFuture<'_, String> {
        let mut rx = self.0.sim.ended();
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(why) => format!("powered off: {}", why.clone().unwrap_or_default()),
                Err(_) => "the simulated VM's thread ended".into(),
            }
        })
    }

    fn pause(&self) -> BoxFuture<'_, Result<()>> {
        self.0.paused.store(true, Ordering::SeqCst);
        self.0.pauses.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }

    fn resume(&self) -> BoxFuture<'_, Result<()>> {
        self.0.paused.store(false, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }

    fn kill(&self) {
        self.0.sim.machine().pull_the_plug("killed by the host");
    }

    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                self.kill();
                self.wait().await;
            }
        })
    }

    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }

    fn diagnostics(&self) -> String {
        format!(
            "(fake VM: the agent served in-process; ended: {:?})",
            self.0.ended()
        )
    }
}

#[cfg(test)]
mod tests {
    use agentvm_protocol::{ExitStatus, Frame, Message, ProcessSpec, RootfsSpec, StartRequest};

    use super::*;

    fn vm_config() -> VmConfig {
        VmConfig {
            kernel: Default::default(),
            initrd: Default::default(),
            disks: Vec::new(),
            shares: Vec::new(),
            nics: Vec::new(),
            netns: None,
            memory_mib: 128,
            vcpus: 1,
            accel: crate::vmm::Accel::Tcg,
            state_dir: "/nonexistent".into(),
            cmdline: Vec::new(),
            icount: false,
            cgroup: None,
        }
    }

    fn start(args: &[&str], init: bool) -> Frame {
        Frame::Msg(Message::Start(Box::new(StartRequest {
            rootfs: RootfsSpec {
                device: "rootfs".into(),
                fstype: "virtiofs".into(),
                overlay: false,
                options: None,
                layers: None,
                subdir: None,
            },
            process: ProcessSpec {
                args: args.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/usr/bin:/bin".into()],
                cwd: "/".into(),
                ..Default::default()
            },
            hostname: Some("never-set-on-the-host".into()),
            init,
            pid_namespace: false,
            network: None,
            mounts: Vec::new(),
            sysctls: Default::default(),
            container: None,
            secrets: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
        })))
    }

    /// Frames until the end of the connection; stdout collected.
    async fn rest(conn: &mut crate::sandbox::AgentConn) -> (Vec<u8>, Vec<Message>) {
        let (mut out, mut msgs) = (Vec::new(), Vec::new());
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), conn.recv())
                .await
                .expect("the agent went silent");
            match f.unwrap() {
                Some(Frame::Data(agentvm_protocol::Stream::Stdout, b)) => out.extend(b),
                Some(Frame::Msg(m)) => msgs.push(m),
                Some(_) => {}
                None => return (out, msgs),
            }
        }
    }

    /// The real agent behind the fake backend: an exec's output and exit, then the init's
    /// exit powers the VM off (every connection ends, `wait` resolves); the host's hostname
    /// was never touched; the backend counts its launch.
    #[tokio::test]
    async fn the_real_agent_serves_the_fake_vm() {
        let hostname = nix::unistd::gethostname().unwrap();
        let backend = FakeVmm::default();
        let vm = backend.launch(&vm_config()).await.unwrap();
        assert_eq!(backend.launches(), 1);
        assert!(vm.pids().is_empty() && vm.exited().is_none());
        let open = || async {
            let io = vm.dialer().dial().await.unwrap();
            crate::guest::greet(io).await.unwrap().0
        };
        let mut init = open().await;
        init.send(&start(&["sleep", "30"], true)).await.unwrap();
        assert!(matches!(
            init.recv().await.unwrap(),
            Some(Frame::Msg(Message::Started { .. }))
        ));
        let mut exec = open().await;
        exec.send(&start(&["sh", "-c", "echo hi; exit 3"], false))
            .await
            .unwrap();
        exec.send(&Frame::Data(agentvm_protocol::Stream::Stdin, Vec::new()))
            .await
            .unwrap();
        let (out, msgs) = rest(&mut exec).await;
        assert_eq!(out, b"hi\n");
        assert_eq!(
            msgs.last(),
            Some(&Message::Exited(ExitStatus::exited(3))),
            "{msgs:?}"
        );
        assert_eq!(backend.vms()[0].live_pids().len(), 1, "the init runs");
        init.send(&Frame::Msg(Message::Signal { signal: 15 }))
            .await
            .unwrap();
        let (_, msgs) = rest(&mut init).await;
        assert_eq!(
            msgs.last(),
            Some(&Message::Exited(ExitStatus::signaled(15)))
        );
        let why = tokio::time::timeout(Duration::from_secs(10), vm.wait())
            .await
            .expect("the VM powers off after its init");
        assert!(why.contains("init process exited"), "{why}");
        assert!(backend.vms()[0].live_pids().is_empty());
        assert!(vm.dialer().dial().await.is_err(), "nobody listens any more");
        assert_eq!(nix::unistd::gethostname().unwrap(), hostname);
    }

    /// Killing the fake VM ends its processes and connections.
    #[tokio::test]
    async fn a_killed_vm_ends_its_processes() {
        let backend = FakeVmm::default();
        let vm = backend.launch(&vm_config()).await.unwrap();
        let io = vm.dialer().dial().await.unwrap();
        let mut init = crate::guest::greet(io).await.unwrap().0;
        init.send(&start(&["sleep", "30"], true)).await.unwrap();
        assert!(matches!(
            init.recv().await.unwrap(),
            Some(Frame::Msg(Message::Started { .. }))
        ));
        vm.stop(Duration::from_millis(50)).await;
        assert!(vm.exited().unwrap().contains("killed by the host"));
        assert!(backend.vms()[0].live_pids().is_empty());
        let (_, msgs) = rest(&mut init).await;
        assert!(
            !msgs.iter().any(|m| matches!(m, Message::Exited(_))),
            "{msgs:?}"
        );
    }
}
