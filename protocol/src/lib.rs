//! The host<->guest protocol of agentvm.
//!
//! One AF_VSOCK stream connection carries one process: the host connects to the agent's port,
//! the agent greets with [`Message::Hello`], the host sends [`Message::Start`], and from then on
//! both sides exchange stdio [`Frame::Data`] and control [`Frame::Msg`] frames until the agent
//! reports [`Message::Exited`].
//!
//! Wire format of a frame: a 4-byte big-endian length `n` (of what follows), a 1-byte tag, then
//! `n - 1` bytes of payload. Tag 0 carries a JSON-encoded [`Message`]; tags 1..=3 carry raw
//! bytes of stdin, stdout or stderr, where an empty payload means end of stream; tag 4 carries one
//! DNS message on a DNS relay connection. Frames larger
//! than [`MAX_FRAME`] are rejected, so a hostile peer cannot make the other side allocate
//! without bound.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version; the agent announces it in [`Message::Hello`] and the host refuses others.
/// 2: [`StartRequest::secrets`] (an agent of version 1 would drop them without a word).
/// 3: [`Message::Consumed`]: a process's output is sent within a window the host opens as it
/// reads (an agent of version 2 would never wait, a host of version 2 never open it).
/// 4: [`ProcessSpec::seccomp`], [`StartRequest::masked_paths`] and
/// [`StartRequest::readonly_paths`] (an agent of version 3 would drop the spec's confinement
/// without a word); [`Message::MemberStats`] (a pod container's own figures).
/// 5: [`Message::FreezeContainer`] (pausing one container of a pod, not the pod's VM).
pub const VERSION: u32 = 5;

/// How much of a process's output the agent sends before the host says it has read it
/// ([`Message::Consumed`]). The userspace vsock device (vhost-device-vsock, where the host has
/// no /dev/vhost-vsock) stalls a connection for good once the host's socket is full; with at
/// most this much in flight, it never is.
pub const OUTPUT_WINDOW: u64 = 64 * 1024;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The vsock CID of the host (`VMADDR_CID_HOST`); the agent accepts connections only from it.
pub const HOST_CID: u32 = 2;
/// Largest accepted frame (tag + payload), in bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// Frame tag of [`Frame::Dns`].
const DNS_TAG: u8 = 4;
/// Largest stdio chunk a sender puts into one frame.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Errors of encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed in the middle of a frame.
    #[error("agent connection i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    /// A zero-length frame has no tag.
    #[error("empty frame")]
    EmptyFrame,
    /// The tag byte is not one this version knows.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// A control frame did not hold a valid [`Message`].
    #[error("malformed control message: {0}")]
    BadMessage(#[from] serde_json::Error),
}

/// Which stdio stream a [`Frame::Data`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdin = 1,
    Stdout = 2,
    Stderr = 3,
}

/// One unit on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A control message.
    Msg(Message),
    /// Stdio bytes; empty means end of that stream.
    Data(Stream, Vec<u8>),
    /// One DNS message (query guest -> host, reply host -> guest) on a
    /// [`Message::DnsRelay`] connection. Tag 4.
    Dns(Vec<u8>),
}

/// Control messages, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Guest -> host, first frame of every connection.
    Hello {
        version: u32,
        /// Guest uptime when the agent accepted the connection (boot timing).
        uptime_ms: u64,
    },
    /// Host -> guest: run a process.
    Start(Box<StartRequest>),
    /// Host -> guest: deliver a signal to the process.
    Signal { signal: i32 },
    /// Host -> guest: the terminal was resized.
    Resize { rows: u16, cols: u16 },
    /// Host -> guest: power the VM off now.
    Shutdown,
    /// Host -> guest, on a process connection: the host has read this many more bytes of the
    /// process's output ([`OUTPUT_WINDOW`]).
    Consumed { bytes: u64 },
    /// Guest -> host: the process runs, with this pid inside the guest.
    Started { pid: i32 },
    /// Guest -> host: the process ended; the last message of a connection.
    Exited(ExitStatus),
    /// Host -> guest, first frame of a DNS relay connection: listen for DNS queries (UDP) on
    /// `address`:53 inside the guest and relay each one to the host as a [`Frame::Dns`]; the
    /// host answers with [`Frame::Dns`] replies. The agent answers [`Message::Ready`].
    DnsRelay { address: String },
    /// Guest -> host: a [`Message::DnsRelay`] listens.
    Ready,
    /// Host -> guest, first frame of a stats connection: report the guest's resource usage;
    /// the agent answers [`Message::StatsReply`] and closes.
    Stats,
    /// Host -> guest, first frame of a stats connection for a pod's later container: report
    /// the usage of that container's cgroup; the agent answers [`Message::StatsReply`] or
    /// [`Message::Error`] and closes.
    MemberStats { container: String },
    /// Guest -> host: resource usage of the whole guest (the container's VM), or of one
    /// container's cgroup for [`Message::MemberStats`].
    StatsReply(GuestStats),
    /// Host -> guest, first frame of an update connection (`docker update`): apply these
    /// limits to the container's cgroup; the agent answers [`Message::Updated`] or
    /// [`Message::Error`] and closes.
    Update(ResourceLimits),
    /// Host -> guest, first frame of an update connection for a container of a pod's VM
    /// beside the VM's own (the CRI's UpdateContainerResources): as [`Message::Update`], on
    /// that container's cgroup.
    UpdateContainer {
        container: String,
        limits: ResourceLimits,
    },
    /// Host -> guest, first frame of a connection: freeze (`frozen`) or thaw the processes of
    /// a container of a pod's VM beside the VM's own (a task pause of that container; the
    /// VM and the pod's other containers keep running), through its cgroup's
    /// `cgroup.freeze`. The agent answers [`Message::Ready`] once the kernel reports the
    /// cgroup frozen (thawed), or [`Message::Error`], and closes.
    FreezeContainer { container: String, frozen: bool },
    /// Guest -> host: the limits of a [`Message::Update`] are in place, except the ones named
    /// in `skipped` (files the guest kernel does not have, e.g. `memory.swap.max` without swap).
    Updated {
        #[serde(default)]
        skipped: Vec<String>,
    },
    /// Host -> guest, first frame of a connection: the host changed the container's root
    /// behind the guest's back (`docker cp` into a running container): drop the cached
    /// directory entries so the guest looks again. The agent answers [`Message::Ready`].
    ForgetCaches,
    /// Host -> guest, first frame of a port-forward connection (the CRI's PortForward, as
    /// `kubectl port-forward` reaches `localhost:PORT` in the pod): connect to `port` on the
    /// guest's loopback (127.0.0.1, else ::1). The agent answers [`Message::Ready`] and then
    /// relays the connection's bytes, host -> guest as [`Stream::Stdin`] data and guest -> host
    /// as [`Stream::Stdout`] data, an empty frame ending that direction; or
    /// [`Message::Error`] when nothing accepts the connection.
    Connect { port: u16 },
    /// Guest -> host: the request failed. For a start failure `exit_code` is what a runc user
    /// would see (127 for a missing binary, 126 for one that cannot be executed).
    Error {
        message: String,
        exit_code: Option<i32>,
    },
}

/// What to run and in which root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    pub rootfs: RootfsSpec,
    pub process: ProcessSpec,
    /// Hostname to set in the guest; none keeps the agent's default.
    #[serde(default)]
    pub hostname: Option<String>,
    /// When true the VM powers off once this process exits (the container's init process).
    #[serde(default)]
    pub init: bool,
    /// The init runs as pid 1 of a PID namespace of its own (a pod sandbox's pause), which
    /// the pod's containers that share the pod's PID namespace (`shareProcessNamespace`)
    /// join; otherwise it shares the agent's (init only).
    #[serde(default)]
    pub pid_namespace: bool,
    /// Network of the guest, applied before the init process starts (init only).
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    /// Mounts set up in the container root after the rootfs, in order (init only).
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Kernel parameters (`net.ipv4.ping_group_range`), written to `/proc/sys` once the
    /// network is configured (init only).
    #[serde(default)]
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// The container of a pod's VM this process belongs to; none: the VM's own container
    /// (the Docker container, or the pod sandbox), as every host before pods sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<PodContainer>,
    /// Secrets of the container (init only: the VM's own container's init, or a pod
    /// container's creating process), decrypted by the host. The agent mounts a tmpfs on
    /// [`SECRETS_DIR`] in the container root and writes the file ones there; the env ones
    /// are added to the environment of the init and of every later process of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretSpec>,
    /// The spec's `linux.maskedPaths` (init only: the container's first process): inside the
    /// container root, `/dev/null` is bound over each file and an empty read-only tmpfs over
    /// each directory; a path that does not exist is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    /// The spec's `linux.readonlyPaths` (init only): each is bound on itself read-only; a
    /// path that does not exist is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readonly_paths: Vec<String>,
}

/// Where the agent puts the file secrets in the container: a tmpfs of their own, read-only
/// once written.
pub const SECRETS_DIR: &str = "/run/secrets";

/// One secret delivered to the guest. Its `Debug` never shows the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    /// The secret's name: the file name under [`SECRETS_DIR`] and, with `env`, the variable.
    pub name: String,
    pub value: SecretValue,
    /// As a file `<SECRETS_DIR>/<name>`, mode 0400, owned by the process's uid and gid.
    #[serde(default)]
    pub file: bool,
    /// As the environment variable `<name>` of the container's processes.
    #[serde(default)]
    pub env: bool,
}

/// A secret's bytes: zeroed when dropped, redacted in `Debug`, hex on the wire (JSON has no
/// bytes, and hex never needs escaping).
#[derive(Clone, PartialEq, Eq, Default, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0.len())
    }
}

/// Writes bytes as lowercase hex straight into a formatter (no intermediate copy).
struct Hex<'a>(&'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for &b in self.0 {
            f.write_char(DIGITS[usize::from(b >> 4)] as char)?;
            f.write_char(DIGITS[usize::from(b & 0xf)] as char)?;
        }
        Ok(())
    }
}

impl Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&Hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SecretValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a hex string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretValue, E> {
                decode_hex(v.as_bytes())
                    .map(SecretValue)
                    .ok_or_else(|| E::custom("a secret value is not valid hex"))
            }
            fn visit_string<E: serde::de::Error>(self, mut v: String) -> Result<SecretValue, E> {
                let r = self.visit_str(&v);
                zeroize::Zeroize::zeroize(&mut v);
                r
            }
        }
        d.deserialize_str(Visitor)
    }
}

fn decode_hex(s: &[u8]) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if s.len() & 1 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 2);
    for pair in s.chunks_exact(2) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => out.push(h << 4 | l),
            _ => {
                zeroize::Zeroize::zeroize(&mut out);
                return None;
            }
        }
    }
    Some(out)
}

/// A container that runs in a pod's VM beside the VM's own (the pod sandbox's): its own root
/// (mounted from `rootfs`), cgroup and, if asked, PID namespace; the pod's network, UTS and
/// IPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodContainer {
    /// The container's id (the engine's), unique in the VM.
    pub id: String,
    /// This process creates the container and is its init: the agent mounts its root and
    /// its mounts first, and when it exits, ends the container's other processes and
    /// unmounts its root (the VM keeps running). Otherwise the process runs in the existing
    /// container `id` (an exec).
    #[serde(default)]
    pub create: bool,
    /// The container gets a PID namespace of its own (Kubernetes' default); otherwise it
    /// shares the VM's (`shareProcessNamespace`).
    #[serde(default)]
    pub own_pid_namespace: bool,
    /// The root is made read-only once its mount points exist.
    #[serde(default)]
    pub readonly_root: bool,
    /// The limits of the container's cgroup (the spec's `linux.resources`), written before
    /// its init starts.
    #[serde(default)]
    pub limits: Option<ResourceLimits>,
}

/// Resource usage of the guest, in the units of cgroup v2 (`cpu.stat`, `memory.stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    /// Memory in use (total minus free), bytes.
    pub memory_usage: u64,
    /// Memory of the guest (its limit), bytes.
    pub memory_limit: u64,
    pub memory_anon: u64,
    /// Page cache, bytes.
    pub memory_file: u64,
    pub memory_active_file: u64,
    pub memory_inactive_file: u64,
    /// Processes in the guest, the agent excluded.
    pub pids: u64,
    /// OOM kills since boot.
    pub oom_kills: u64,
}

/// Limits of the container's cgroup, in cgroup v2 terms (the host converts the OCI values).
/// `None` leaves a limit as it is; a negative value removes it (`max`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// `memory.max`, bytes.
    #[serde(default)]
    pub memory_max: Option<i64>,
    /// `memory.low`, bytes (the OCI memory reservation).
    #[serde(default)]
    pub memory_low: Option<i64>,
    /// `memory.swap.max`, bytes of swap on top of `memory.max`.
    #[serde(default)]
    pub memory_swap_max: Option<i64>,
    /// `cpu.max`.
    #[serde(default)]
    pub cpu_max: Option<CpuMax>,
    /// `cpu.weight`, 1..=10000.
    #[serde(default)]
    pub cpu_weight: Option<u64>,
    /// `pids.max`.
    #[serde(default)]
    pub pids_max: Option<i64>,
}

/// `cpu.max`: `quota` microseconds of CPU time per `period` microseconds (negative quota: no
/// limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuMax {
    pub quota: i64,
    pub period: u64,
}

/// The guest's network: interfaces (matched by MAC address) and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub interfaces: Vec<InterfaceSpec>,
    /// Routes, added after every interface is up, in order.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

/// One guest interface: the virtio-net device with `mac` gets `name`, `mtu` and `addresses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceSpec {
    /// Name inside the guest, e.g. `eth0`.
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub mtu: u32,
    /// Addresses in CIDR form, IPv4 or IPv6, e.g. `172.17.0.2/16`.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// One route. `destination` is CIDR, or `default` (IPv4) / `default6` (IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub destination: String,
    #[serde(default)]
    pub gateway: Option<String>,
    /// Guest interface name.
    pub device: String,
}

/// One mount in the container root. `destination` is an absolute path in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub destination: String,
    pub source: MountSource,
    #[serde(default)]
    pub readonly: bool,
}

/// Where a [`MountSpec`]'s content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MountSource {
    /// A host directory shared with this mount tag; `options` as in [`RootfsSpec::options`].
    /// `fstype` is the transport's filesystem: `9p` (virtio-9p, the default, which is what a
    /// host that predates the field means) or `virtiofs`.
    Share {
        tag: String,
        options: String,
        #[serde(default = "default_share_fstype")]
        fstype: String,
    },
    /// A small host file (`/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`), copied: the
    /// agent writes `content` to a file of its own and bind-mounts it on `destination`.
    File { content: String, mode: u32 },
    /// A directory of a share already mounted for a pod's containers (the pod share, `tag`),
    /// bound on `destination`: a later container's volume, which the host bound into the
    /// pod share as `subdir` (relative, without `..`). With `file`, `subdir` is a file (a
    /// writable file bind, e.g. kubelet's termination message file), bound on a file.
    ShareDir {
        tag: String,
        subdir: String,
        #[serde(default)]
        file: bool,
    },
    /// The pod's `/dev/shm` (a pod container's, as the CRI binds the sandbox's shm into
    /// each): the VM's own container's (the sandbox's) `/dev/shm` tmpfs, bound on
    /// `destination`, so that the pod's containers share its files as under runc.
    PodShm,
    /// A tmpfs with mount(2) `data` options, e.g. `size=65536k,mode=1777`.
    Tmpfs {
        #[serde(default)]
        options: Option<String>,
    },
}

fn default_share_fstype() -> String {
    "9p".into()
}

/// The container's root filesystem: a block device or a shared directory seen by the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Guest device path, e.g. `/dev/vda`, or the mount tag of a shared directory.
    pub device: String,
    /// Filesystem type, e.g. `ext4`, `9p` or `virtiofs`.
    pub fstype: String,
    /// Put a tmpfs-backed overlay on top so the workload can write while the disk stays
    /// read-only.
    #[serde(default)]
    pub overlay: bool,
    /// Filesystem-specific mount options (the `data` argument of mount(2)), e.g.
    /// `trans=virtio,version=9p2000.L` for a 9p share.
    #[serde(default)]
    pub options: Option<String>,
    /// When set, the root is this overlay instead, and the fields above are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayeredRoot>,
    /// With a shared directory (`device` is its tag): the root is this directory of the
    /// share (relative path) instead of the share's top. The share is mounted once and may
    /// hold the roots of several containers (a pod's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdir: Option<String>,
}

/// A container root assembled in the guest from read-only image layers on block devices and
/// a writable layer in a shared host directory (the container engine's own upper dir, so the
/// engine sees every write: `docker diff`, `docker commit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayeredRoot {
    /// ext4 block devices (`/dev/vda`), mounted read-only: the overlay's lower layers, top
    /// first.
    pub lower: Vec<String>,
    /// Mount tag of the share holding the writable layer and the overlay's work directory.
    pub tag: String,
    /// The share's filesystem type (`virtiofs`).
    pub fstype: String,
    /// The share's mount(2) data options.
    #[serde(default)]
    pub options: Option<String>,
    /// The writable layer: a directory of the share (relative path).
    pub upper: String,
    /// The overlay's work directory: a directory of the share, made if missing.
    pub work: String,
    /// Mount the root read-only: the writable layer becomes the top lower layer.
    #[serde(default)]
    pub readonly: bool,
}

/// The OCI `process` object, as far as the agent applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default = "default_cwd")]
    pub cwd: String,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub terminal: bool,
    /// Initial terminal size (rows, cols) when `terminal` is set.
    #[serde(default)]
    pub console_size: Option<(u16, u16)>,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    /// Capability sets; `None` leaves the agent's full set (a privileged process).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// The container's seccomp profile (the spec's `linux.seccomp`), loaded right before the
    /// exec; `None` runs the process without a filter. An exec carries its container's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<Seccomp>,
}

/// An OCI seccomp profile (`linux.seccomp`), with the OCI field names and values
/// (`SCMP_ACT_ERRNO`, `SCMP_ARCH_X86_64`, `SCMP_CMP_MASKED_EQ`, `SECCOMP_FILTER_FLAG_LOG`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seccomp {
    pub default_action: String,
    /// The errno of a `SCMP_ACT_ERRNO` (or `SCMP_ACT_TRACE`) default action; EPERM if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    #[serde(default)]
    pub syscalls: Vec<SeccompSyscall>,
}

/// One rule of a [`Seccomp`] profile: `action` for the syscalls `names` when `args` match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompSyscall {
    pub names: Vec<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<SeccompArg>,
}

/// A condition on one syscall argument: `arg[index] op value` (for `SCMP_CMP_MASKED_EQ`,
/// `arg[index] & value == value_two`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompArg {
    pub index: u32,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

fn default_cwd() -> String {
    "/".to_string()
}

/// Numeric user of the process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// One POSIX rlimit, named as in OCI (`RLIMIT_NOFILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

/// Capability sets, named as in OCI (`CAP_CHOWN`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Shell-style code: the exit code, or 128 + the signal number.
    pub code: i32,
    /// The signal that killed the process, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The guest kernel's OOM killer ended it (the container hit its memory limit).
    #[serde(default)]
    pub oom: bool,
}

impl ExitStatus {
    pub fn exited(code: i32) -> Self {
        Self {
            code,
            signal: None,
            oom: false,
        }
    }

    pub fn signaled(signal: i32) -> Self {
        Self {
            code: 128 + signal,
            signal: Some(signal),
            oom: false,
        }
    }
}

impl Frame {
    /// Serializes the frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Msg(m) => (
                0,
                serde_json::to_vec(m)
                    .expect("protocol messages always serialize")
                    .into(),
            ),
            Frame::Data(s, b) => (*s as u8, b.as_slice().into()),
            Frame::Dns(b) => (DNS_TAG, b.as_slice().into()),
        };
        let len = u32::try_from(payload.len() + 1).expect("frame length fits in u32");
        let mut out = Vec::with_capacity(payload.len() + 5);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(tag);
        out.extend_from_slice(&payload);
        out
    }

    /// Parses a frame body (tag + payload), as read after the length prefix.
    pub fn decode_body(body: &[u8]) -> Result<Self, ProtocolError> {
        let (&tag, payload) = body.split_first().ok_or(ProtocolError::EmptyFrame)?;
        Ok(match tag {
            0 => Frame::Msg(serde_json::from_slice(payload)?),
            1 => Frame::Data(Stream::Stdin, payload.to_vec()),
            2 => Frame::Data(Stream::Stdout, payload.to_vec()),
            3 => Frame::Data(Stream::Stderr, payload.to_vec()),
            DNS_TAG => Frame::Dns(payload.to_vec()),
            t => return Err(ProtocolError::UnknownTag(t)),
        })
    }

    /// Checks a length prefix before anything is allocated for the body.
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
        let n = u32::from_be_bytes(prefix) as usize;
        if n == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        if n > MAX_FRAME {
            return Err(ProtocolError::FrameTooLarge(n));
        }
        Ok(n)
    }
}

/// Reads one frame from a blocking reader. `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = Frame::check_len(prefix)?;
    let mut body = vec![0u8; n];
    let read = r.read_exact(&mut body);
    let frame = read
        .map_err(ProtocolError::from)
        .and_then(|()| Frame::decode_body(&body));
    scrub_control(&mut body);
    frame.map(Some)
}

/// Writes one frame to a blocking writer.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    let mut bytes = frame.encode();
    let written = w.write_all(&bytes).and_then(|()| w.flush());
    scrub_encoded(frame, &mut bytes);
    Ok(written?)
}

/// Zeroes the bytes of a control frame once decoded: a start request may carry secrets.
fn scrub_control(body: &mut [u8]) {
    if body.first() == Some(&0) {
        zeroize::Zeroize::zeroize(body);
    }
}

/// Zeroes an encoded control frame once written (see [`scrub_control`]).
fn scrub_encoded(frame: &Frame, bytes: &mut Vec<u8>) {
    if matches!(frame, Frame::Msg(_)) {
        zeroize::Zeroize::zeroize(bytes);
    }
}

/// Async counterparts of [`read_frame`] and [`write_frame`] for tokio streams.
pub mod tokio_io {
    use super::{Frame, ProtocolError};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one frame. `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Option<Frame>, ProtocolError> {
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = r.read(&mut prefix[got..]).await?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            got += n;
        }
        let n = Frame::check_len(prefix)?;
        let mut body = vec![0u8; n];
        let read = r.read_exact(&mut body).await;
        let frame = read
            .map_err(ProtocolError::from)
            .and_then(|_| Frame::decode_body(&body));
        super::scrub_control(&mut body);
        frame.map(Some)
    }

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin>(
        w: &mut W,
        frame: &Frame,
    ) -> Result<(), ProtocolError> {
        let mut bytes = frame.encode();
        let mut written = w.write_all(&bytes).await;
        if written.is_ok() {
            written = w.flush().await;
        }
        super::scrub_encoded(frame, &mut bytes);
        Ok(written?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let back = read_frame(&mut bytes.as_slice()).unwrap().unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn a_seccomp_profile_reads_as_oci_writes_it() {
        let json = r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW",
            "args":[{"index":0,"value":2114060288,"op":"SCMP_CMP_MASKED_EQ"}]},
            {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}],
            "listenerPath":"/ignored"}"#;
        let p: Seccomp = serde_json::from_str(json).unwrap();
        assert_eq!(p.default_errno_ret, None);
        assert_eq!(p.syscalls[0].args[0].value_two, 0);
        assert_eq!(p.syscalls[0].args[0].value, 2114060288);
        assert_eq!(p.syscalls[1].errno_ret, Some(38));
        let back: Seccomp = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Msg(Message::Hello {
            version: VERSION,
            uptime_ms: 1234,
        }));
        roundtrip(Frame::Msg(Message::Start(Box::new(StartRequest {
            rootfs: RootfsSpec {
                device: "/dev/vda".into(),
                fstype: "ext4".into(),
                overlay: true,
                options: None,
                layers: None,
                subdir: None,
            },
            process: ProcessSpec {
                args: vec!["sh".into(), "-c".into(), "exit 7".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/tmp".into(),
                user: User {
                    uid: 1000,
                    gid: 1000,
                    additional_gids: vec![10, 20],
                },
                terminal: true,
                console_size: Some((24, 80)),
                rlimits: vec![Rlimit {
                    kind: "RLIMIT_NOFILE".into(),
                    hard: 1024,
                    soft: 512,
                }],
                no_new_privileges: true,
                capabilities: Some(Capabilities {
                    bounding: vec!["CAP_CHOWN".into()],
                    ..Default::default()
                }),
                seccomp: Some(Seccomp {
                    default_action: "SCMP_ACT_ERRNO".into(),
                    default_errno_ret: Some(1),
                    architectures: vec!["SCMP_ARCH_X86_64".into()],
                    flags: vec!["SECCOMP_FILTER_FLAG_LOG".into()],
                    syscalls: vec![SeccompSyscall {
                        names: vec!["personality".into()],
                        action: "SCMP_ACT_ALLOW".into(),
                        errno_ret: None,
                        args: vec![SeccompArg {
                            index: 0,
                            value: 8,
                            value_two: 0,
                            op: "SCMP_CMP_EQ".into(),
                        }],
                    }],
                }),
            },
            hostname: Some("box".into()),
            init: true,
            pid_namespace: true,
            network: Some(NetworkSpec {
                interfaces: vec![InterfaceSpec {
                    name: "eth0".into(),
                    mac: "02:42:ac:11:00:02".into(),
                    mtu: 1500,
                    addresses: vec!["172.17.0.2/16".into()],
                }],
                routes: vec![RouteSpec {
                    destination: "default".into(),
                    gateway: Some("172.17.0.1".into()),
                    device: "eth0".into(),
                }],
            }),
            mounts: vec![
                MountSpec {
                    destination: "/etc/hosts".into(),
                    source: MountSource::File {
                        content: "127.0.0.1 localhost\n".into(),
                        mode: 0o644,
                    },
                    readonly: false,
                },
                MountSpec {
                    destination: "/data".into(),
                    source: MountSource::Share {
                        tag: "m0".into(),
                        options: "trans=virtio".into(),
                        fstype: "9p".into(),
                    },
                    readonly: true,
                },
                MountSpec {
                    destination: "/work".into(),
                    source: MountSource::Share {
                        tag: "m1".into(),
                        options: String::new(),
                        fstype: "virtiofs".into(),
                    },
                    readonly: true,
                },
                MountSpec {
                    destination: "/run".into(),
                    source: MountSource::Tmpfs { options: None },
                    readonly: false,
                },
            ],
            sysctls: Default::default(),
            container: None,
            secrets: vec![SecretSpec {
                name: "API_KEY".into(),
                value: SecretValue::new(b"s3cr\x00t\n\xff".to_vec()),
                file: true,
                env: true,
            }],
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
        }))));
        roundtrip(Frame::Msg(Message::Start(Box::new(StartRequest {
            rootfs: RootfsSpec {
                device: "pod".into(),
                fstype: "virtiofs".into(),
                overlay: false,
                options: None,
                layers: None,
                subdir: Some("c1/rootfs".into()),
            },
            process: ProcessSpec::default(),
            hostname: None,
            init: false,
            pid_namespace: false,
            network: None,
            mounts: Vec::new(),
            sysctls: Default::default(),
            container: Some(PodContainer {
                id: "c1".into(),
                create: true,
                own_pid_namespace: true,
                readonly_root: false,
                limits: Some(ResourceLimits {
                    memory_max: Some(64 << 20),
                    ..Default::default()
                }),
            }),
            secrets: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
        }))));
        roundtrip(Frame::Msg(Message::DnsRelay {
            address: "127.0.0.11".into(),
        }));
        roundtrip(Frame::Msg(Message::Ready));
        roundtrip(Frame::Msg(Message::Stats));
        roundtrip(Frame::Msg(Message::MemberStats {
            container: "c1".into(),
        }));
        roundtrip(Frame::Msg(Message::ForgetCaches));
        roundtrip(Frame::Msg(Message::FreezeContainer {
            container: "c1".into(),
            frozen: true,
        }));
        roundtrip(Frame::Msg(Message::Connect { port: 8080 }));
        roundtrip(Frame::Msg(Message::UpdateContainer {
            container: "c1".into(),
            limits: ResourceLimits::default(),
        }));
        let volume = MountSpec {
            destination: "/data".into(),
            source: MountSource::ShareDir {
                tag: "pod".into(),
                subdir: "c1/mounts/0".into(),
                file: false,
            },
            readonly: true,
        };
        assert_eq!(
            serde_json::from_str::<MountSpec>(&serde_json::to_string(&volume).unwrap()).unwrap(),
            volume
        );
        roundtrip(Frame::Msg(Message::StatsReply(GuestStats {
            cpu_usage_usec: 12,
            memory_usage: 1 << 20,
            pids: 3,
            ..Default::default()
        })));
        roundtrip(Frame::Msg(Message::Update(ResourceLimits {
            memory_max: Some(64 << 20),
            memory_swap_max: Some(0),
            cpu_max: Some(CpuMax {
                quota: 50_000,
                period: 100_000,
            }),
            cpu_weight: Some(100),
            pids_max: Some(-1),
            ..Default::default()
        })));
        roundtrip(Frame::Msg(Message::Updated {
            skipped: vec!["memory.swap.max".into()],
        }));
        roundtrip(Frame::Dns(vec![0x12, 0x34, 1, 0]));
        roundtrip(Frame::Msg(Message::Exited(ExitStatus::signaled(9))));
        roundtrip(Frame::Data(Stream::Stdout, b"hello\n".to_vec()));
        roundtrip(Frame::Data(Stream::Stdin, Vec::new()));
    }

    #[test]
    fn a_start_from_a_host_before_pods_is_the_vms_own_container() {
        let m: Message = serde_json::from_str(
            r#"{"type":"start","rootfs":{"device":"/dev/vda","fstype":"ext4"},
                "process":{"args":["true"]}}"#,
        )
        .unwrap();
        let Message::Start(req) = m else {
            panic!("not a start: {m:?}")
        };
        assert_eq!((&req.container, &req.rootfs.subdir), (&None, &None));
        // And a host before pods reads a request without the new fields the same way.
        let json = serde_json::to_string(&Message::Start(req)).unwrap();
        assert!(
            !json.contains("container") && !json.contains("subdir"),
            "{json}"
        );
    }

    #[test]
    fn secret_values_are_hex_on_the_wire_and_redacted_in_debug() {
        let spec = SecretSpec {
            name: "TOKEN".into(),
            value: SecretValue::new(b"hunter2\x00\xff".to_vec()),
            file: true,
            env: false,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""value":"68756e7465723200ff""#), "{json}");
        let back: SecretSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        let shown = format!(
            "{spec:?} {:?}",
            Message::Start(Box::new(StartRequest {
                rootfs: RootfsSpec {
                    device: "/dev/vda".into(),
                    fstype: "ext4".into(),
                    overlay: false,
                    options: None,
                    layers: None,
                    subdir: None,
                },
                process: ProcessSpec::default(),
                hostname: None,
                init: true,
                pid_namespace: false,
                network: None,
                mounts: Vec::new(),
                sysctls: Default::default(),
                container: None,
                secrets: vec![spec.clone()],
                masked_paths: Vec::new(),
                readonly_paths: Vec::new(),
            }))
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("68756e"),
            "{shown}"
        );
        assert!(shown.contains("<redacted, 9 bytes>"), "{shown}");
        for bad in [r#""abc""#, r#""zz""#, "12"] {
            let json = format!(r#"{{"name":"T","value":{bad}}}"#);
            assert!(serde_json::from_str::<SecretSpec>(&json).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_start_without_secrets_reads_as_before() {
        let m: Message = serde_json::from_str(
            r#"{"type":"start","rootfs":{"device":"/dev/vda","fstype":"ext4"},
                "process":{"args":["true"]}}"#,
        )
        .unwrap();
        let Message::Start(req) = m else {
            panic!("not a start: {m:?}")
        };
        assert!(req.secrets.is_empty());
        let json = serde_json::to_string(&Message::Start(req)).unwrap();
        assert!(!json.contains("secrets"), "{json}");
    }

    #[test]
    fn rootfs_options_default_to_none() {
        let old: RootfsSpec =
            serde_json::from_str(r#"{"device":"/dev/vda","fstype":"ext4"}"#).unwrap();
        assert_eq!(old.options, None);
        assert!(!old.overlay);
    }

    #[test]
    fn shares_without_fstype_are_9p() {
        // What a host from before the field sends.
        let old: MountSpec = serde_json::from_str(
            r#"{"destination":"/d","source":{"kind":"share","tag":"vol0","options":"trans=virtio"}}"#,
        )
        .unwrap();
        assert_eq!(
            old.source,
            MountSource::Share {
                tag: "vol0".into(),
                options: "trans=virtio".into(),
                fstype: "9p".into(),
            }
        );
    }

    #[test]
    fn absent_limits_are_left_alone() {
        let m: Message = serde_json::from_str(r#"{"type":"update","pids_max":50}"#).unwrap();
        assert_eq!(
            m,
            Message::Update(ResourceLimits {
                pids_max: Some(50),
                ..Default::default()
            })
        );
        let m: Message = serde_json::from_str(r#"{"type":"updated"}"#).unwrap();
        assert_eq!(m, Message::Updated { skipped: vec![] });
    }

    #[test]
    fn signal_exit_is_128_plus_n() {
        assert_eq!(ExitStatus::signaled(9).code, 137);
        assert_eq!(ExitStatus::signaled(15).code, 143);
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut bytes = Frame::Data(Stream::Stdout, b"abcdef".to_vec()).encode();
        bytes.truncate(7);
        assert!(matches!(
            read_frame(&mut bytes.as_slice()),
            Err(ProtocolError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut [0u8, 0].as_slice()),
            Err(ProtocolError::Io(_))
        ));
    }

    #[test]
    fn hostile_frames_are_rejected_without_allocating() {
        let huge = (u32::MAX).to_be_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(ProtocolError::FrameTooLarge(_))
        ));
        let empty = 0u32.to_be_bytes();
        assert!(matches!(
            read_frame(&mut empty.as_slice()),
            Err(ProtocolError::EmptyFrame)
        ));
        let mut unknown = 2u32.to_be_bytes().to_vec();
        unknown.extend_from_slice(&[9, 0]);
        assert!(matches!(
            read_frame(&mut unknown.as_slice()),
            Err(ProtocolError::UnknownTag(9))
        ));
        let mut bad_json = 4u32.to_be_bytes().to_vec();
        bad_json.extend_from_slice(b"\0{x}");
        assert!(matches!(
            read_frame(&mut bad_json.as_slice()),
            Err(ProtocolError::BadMessage(_))
        ));
    }
}
