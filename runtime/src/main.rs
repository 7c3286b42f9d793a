//! `agentvm`: run processes in microVMs and inspect the host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm::accel::AccelChoice;
use agentvm::image;
use agentvm::run::{self, RunOptions};
use agentvm_protocol::{ProcessSpec, User};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "agentvm", version, about = "Run containers in microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command in a fresh microVM booted from an ext4 root filesystem.
    Run(RunArgs),
    /// Report what this host has and lacks for running agentvm VMs.
    Check {
        /// Boot a test VM under KVM to find out whether KVM really works here.
        #[arg(long)]
        probe: bool,
        /// Also boot a VM and check the guest kernel: every syscall Docker's default seccomp
        /// profile allows must be implemented, and timers, madvise, process_vm_readv and
        /// Landlock must work (runs agentvm-syscall-probe in the guest).
        #[arg(long)]
        guest: bool,
    },
    /// Register the agentvm runtime with Docker (/etc/docker/daemon.json) and containerd's CRI
    /// plugin (/etc/containerd/config.toml). Restarts nothing: it says what to reload.
    Install(InstallArgs),
    /// Remove what `install` added from both files. Restarts nothing.
    Uninstall(InstallArgs),
    /// Serve the Model Context Protocol on stdin/stdout: an AI agent creates sandboxes (one
    /// microVM each), runs commands and moves files in them. Every sandbox is removed when the
    /// session ends. `install`/`uninstall` register it with Claude Code (~/.claude.json).
    Mcp {
        #[command(subcommand)]
        action: Option<McpCmd>,
        /// containerd mode: create the sandboxes through containerd with the agentvm runtime,
        /// in a containerd namespace of their own (visible to `ctr -n NAMESPACE c ls`).
        #[arg(long)]
        containerd: bool,
        /// containerd's socket (containerd mode).
        #[arg(long, value_name = "PATH", default_value = agentvm::mcp::ctrd::DEFAULT_ADDRESS, requires = "containerd")]
        address: PathBuf,
        /// The containerd namespace of the sandboxes (containerd mode; never `moby`).
        #[arg(long, value_name = "NAME", default_value = agentvm::mcp::ctrd::DEFAULT_NAMESPACE, requires = "containerd")]
        namespace: String,
    },
    /// A running container's egress policy: show it, change it, read what it blocked.
    Policy {
        #[command(subcommand)]
        action: PolicyCmd,
    },
    /// Secrets, stored encrypted (AES-256-GCM) in /var/lib/agentvm/secrets with the key in
    /// /etc/agentvm/secrets.key; a container gets them by name with the annotation
    /// io.agentvm.secrets=NAME[,NAME...] (files in /run/secrets) or
    /// io.agentvm.secrets-env=NAME[,NAME...] (environment variables).
    Secret {
        #[command(subcommand)]
        action: SecretCmd,
    },
}

#[derive(Subcommand, Debug)]
enum SecretCmd {
    /// Stores a secret; the value is read from stdin, byte for byte (`printf %s "$TOKEN" |
    /// agentvm secret set NAME`), or, from a terminal, one line typed without echo.
    Set {
        /// Letters, digits, '_', '.' and '-' (for an environment variable: letters, digits
        /// and '_').
        name: String,
    },
    /// The stored secrets: names and when they were set, never values.
    #[command(alias = "ls")]
    List,
    /// Removes a secret.
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// The policy, its rules in the order they apply, and what it blocked so far.
    Show {
        /// The container's id (or a unique prefix of it).
        container: String,
    },
    /// Applies another policy at once, without a restart: a profile name (open, agent,
    /// none-but, or one of /etc/agentvm/policy.toml) with inline rules after `;`.
    Set { container: String, policy: String },
    /// The blocked connection attempts (time, destination, the rule that blocked it).
    Log {
        container: String,
        /// Keep printing new lines until the container ends.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum McpCmd {
    /// Register `agentvm mcp` as the MCP server "agentvm" in Claude Code's config, if Claude
    /// Code is set up for this user. Idempotent; every other setting stays.
    Install(McpInstallArgs),
    /// Take the "agentvm" MCP server out of Claude Code's config again.
    Uninstall(McpInstallArgs),
    /// The host process of one persistent sandbox (started by `agentvm mcp`).
    #[command(hide = true)]
    Host,
}

#[derive(clap::Args, Debug)]
struct McpInstallArgs {
    /// Claude Code's user config (default: $HOME/.claude.json).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The agentvm binary Claude Code should run (default: this one).
    #[arg(long, value_name = "PATH")]
    command: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct InstallArgs {
    /// The Docker daemon.json to update.
    #[arg(long, value_name = "PATH", default_value = agentvm::install::DOCKER_DAEMON_JSON)]
    docker_config: PathBuf,
    /// The containerd config.toml to update (the CRI runtime table is picked by its
    /// `version`).
    #[arg(long, value_name = "PATH", default_value = agentvm::install::CONTAINERD_CONFIG_TOML)]
    containerd_config: PathBuf,
    /// Also allow containers to run under TCG software emulation where KVM is not usable
    /// (allow_tcg in /etc/agentvm/config.toml): for test and development hosts.
    #[arg(long)]
    allow_tcg: bool,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Root filesystem image (ext4), attached read-only; writes go to a tmpfs overlay.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    rootfs: Option<PathBuf>,
    /// OCI image to run instead of --rootfs (docker-archive:PATH, oci-archive:PATH, oci:DIR,
    /// ...): converted once by agentvm-image and cached; its Entrypoint, Cmd, Env, WorkingDir
    /// and User apply unless overridden.
    image: Option<String>,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Set an environment variable (K=V).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory inside the container (default: the image's, else /).
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// UID[:GID] to run as.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = run::DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = run::DEFAULT_VCPUS)]
    cpus: u32,
    /// Accelerator: auto (KVM if a test boot works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Seconds to wait for the guest agent.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Deterministic guest clock (TCG -icount), for benchmarks.
    #[arg(long, hide = true)]
    icount: bool,
    /// Print a timing breakdown (and turn on the agent's debug log on the VM console).
    #[arg(long)]
    debug: bool,
    /// Give the process secret NAME as the file /run/secrets/NAME (stored first with
    /// `agentvm secret set NAME`); repeatable.
    #[arg(long = "secret", value_name = "NAME")]
    secrets: Vec<String>,
    /// Give the process secret NAME as the environment variable NAME; repeatable.
    #[arg(long = "secret-env", value_name = "NAME")]
    secret_env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread: helpers are spawned with PR_SET_PDEATHSIG, which fires when the spawning
    // *thread* exits, so they must be spawned from a thread that lives as long as we do.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        match cli.command {
            Command::Run(a) => match run_cmd(a).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("agentvm: error: {e:#}");
                    125
                }
            },
            Command::Check { probe, guest } => {
                let findings = agentvm::check::check(probe).await;
                let (text, ready) = agentvm::check::render(&findings);
                print!("{text}");
                let mut code = i32::from(!ready);
                if guest && ready {
                    println!("guest kernel (agentvm-syscall-probe all in a VM):");
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    match agentvm::check::guest(AccelChoice::Auto).await {
                        Ok(0) => {
                            println!("the guest kernel has every syscall and feature checked.")
                        }
                        Ok(c) => {
                            println!("the guest kernel lacks something above (probe exit {c}).");
                            code = 1;
                        }
                        Err(e) => {
                            eprintln!("agentvm: error: guest check: {e:#}");
                            code = 1;
                        }
                    }
                }
                code
            }
            Command::Install(a) => install_cmd(&a, true),
            Command::Uninstall(a) => install_cmd(&a, false),
            Command::Mcp {
                action: None,
                containerd,
                address,
                namespace,
            } => {
                match agentvm::mcp::serve_stdio(containerd.then_some((address, namespace))).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("agentvm: error: {e}");
                        1
                    }
                }
            }
            Command::Mcp {
                action: Some(McpCmd::Host),
                ..
            } => match agentvm::mcp::persist::host().await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("agentvm: error: {e}");
                    1
                }
            },
            Command::Mcp {
                action: Some(action),
                ..
            } => mcp_install_cmd(action),
            Command::Policy { action } => match policy_cmd(action).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("agentvm: error: {e}");
                    1
                }
            },
            Command::Secret { action } => match secret_cmd(action) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("agentvm: error: {e:#}");
                    1
                }
            },
        }
    });
    // Exit without waiting for the blocking stdin reader, which may sit in read(2).
    std::process::exit(code);
}

fn secret_cmd(cmd: SecretCmd) -> anyhow::Result<()> {
    use agentvm::secrets;
    let store = secrets::Store::host();
    match cmd {
        SecretCmd::Set { name } => {
            secrets::validate_name(&name)?;
            let value = read_secret_value(&name)?;
            store.set(&name, value.as_bytes())?;
            eprintln!("secret {name} set ({} bytes)", value.len());
        }
        SecretCmd::List => {
            let listed = store.list()?;
            let width = listed
                .iter()
                .map(|l| l.name.len())
                .max()
                .unwrap_or(4)
                .max(4);
            println!("{:width$}  UPDATED", "NAME");
            for l in listed {
                println!("{:width$}  {}", l.name, secrets::format_time(l.updated));
            }
        }
        SecretCmd::Rm { name } => {
            if !store.remove(&name)? {
                anyhow::bail!("secret {name:?} is not set");
            }
            eprintln!("secret {name} removed");
        }
    }
    Ok(())
}

/// A secret's value from stdin: all of it from a pipe or file; from a terminal, one line
/// typed without echo (its line ending dropped).
fn read_secret_value(name: &str) -> anyhow::Result<agentvm_protocol::SecretValue> {
    use nix::sys::termios::{self, LocalFlags, SetArg};
    use std::io::{BufRead, IsTerminal, Write};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Ok(agentvm::secrets::read_value(&mut stdin.lock())?);
    }
    eprint!("value of secret {name} (not echoed): ");
    let _ = std::io::stderr().flush();
    let fd = stdin.as_fd();
    let saved = termios::tcgetattr(fd)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    termios::tcsetattr(fd, SetArg::TCSANOW, &quiet)?;
    let mut line = zeroize::Zeroizing::new(String::new());
    let read = stdin.lock().read_line(&mut line);
    termios::tcsetattr(fd, SetArg::TCSANOW, &saved)?;
    read?;
    let value = line.trim_end_matches(['\n', '\r']);
    Ok(agentvm::secrets::read_value(&mut value.as_bytes())?)
}

/// The state dir of the running container `id` (or the one whose id starts with it).
fn sandbox_dir(id: &str) -> agentvm::Result<std::path::PathBuf> {
    let root = agentvm::sandbox::state_root();
    let bad = |why: String| agentvm::Error::Invalid(why);
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(bad(format!("{id:?} is not a container id")));
    }
    let exact = root.join(id);
    if exact.is_dir() {
        return Ok(exact);
    }
    let found: Vec<_> = std::fs::read_dir(&root)
        .map_err(|e| agentvm::Error::Invalid(format!("{}: {e}", root.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(id))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(bad(format!(
            "no running agentvm container {id:?} in {} (give its full id: docker inspect -f \
             '{{{{.Id}}}}' NAME)",
            root.display()
        ))),
        _ => Err(bad(format!(
            "{id:?} names {} containers: give more of the id",
            found.len()
        ))),
    }
}

async fn policy_cmd(cmd: PolicyCmd) -> agentvm::Result<()> {
    use agentvm::egress;
    let (PolicyCmd::Show { container }
    | PolicyCmd::Set { container, .. }
    | PolicyCmd::Log { container, .. }) = &cmd;
    let dir = sandbox_dir(container)?;
    let no_table = || {
        agentvm::Error::Invalid(format!(
            "{} has no egress table: it has no network, or it started before nftables was \
             installed (apt-get install nftables, then restart it)",
            dir.display()
        ))
    };
    match cmd {
        PolicyCmd::Show { .. } => {
            let record = egress::Record::load(&dir).map_err(|_| no_table())?;
            let (rules, default) = record.policy.effective(&record.facts);
            println!(
                "policy: {} (base {})",
                record.policy.name,
                record.policy.base.name()
            );
            println!("rules, first match wins:");
            for r in &rules {
                println!("  {}", r.text);
            }
            println!(
                "  default: {}",
                if default == egress::Action::Allow {
                    "allow"
                } else {
                    "deny"
                }
            );
            let logged = [
                egress::log_path(&dir).with_extension("log.1"),
                egress::log_path(&dir),
            ]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.lines().count())
            .sum::<usize>();
            let fd = open_netns(&record.netns)?;
            let nft = egress::nft_program().ok_or_else(|| egress::nft_missing(&record.policy))?;
            let blocked = agentvm::netns::egress_blocked(&fd, &nft).await?;
            println!(
                "blocked: {blocked} packets ({logged} logged; logging is limited to {} a second)",
                egress::AUDIT_RATE
            );
            if record.policy.has_domains() {
                let listing = agentvm::netns::egress_listing(&fd, &nft).await?;
                let learnt =
                    egress::carried_over(&record.policy, &record.policy, &record.facts, &listing);
                let domains = record.policy.domains();
                println!("learnt from DNS answers: {}", learnt.len());
                for l in &learnt {
                    let domain = l
                        .set
                        .rsplit('_')
                        .next()
                        .and_then(|i| i.parse::<usize>().ok())
                        .and_then(|i| domains.get(i))
                        .map_or("?", String::as_str);
                    println!("  {domain} {} ({} s left)", l.addr, l.ttl);
                }
            }
            Ok(())
        }
        PolicyCmd::Set { policy, .. } => {
            let mut record = egress::Record::load(&dir).map_err(|_| no_table())?;
            let old = record.policy.clone();
            let file = egress::PolicyFile::load(&egress::policy_path())
                .map_err(|e| agentvm::Error::Invalid(e.to_string()))?;
            record.policy = file
                .select(Some(&policy))
                .map_err(|e| agentvm::Error::Invalid(e.to_string()))?;
            if record.policy.has_domains() && !record.dns_relay {
                return Err(agentvm::Error::Invalid(
                    egress::domains_need_relay(&record.policy).to_string(),
                ));
            }
            let fd = open_netns(&record.netns)?;
            let nft = egress::nft_program().ok_or_else(|| egress::nft_missing(&record.policy))?;
            agentvm::netns::change_egress(&fd, &nft, &old, &record).await?;
            record.save(&dir)?;
            println!(
                "agentvm: egress policy of {} is now {:?}",
                dir.display(),
                record.policy.name
            );
            Ok(())
        }
        PolicyCmd::Log { follow, .. } => {
            let log = egress::log_path(&dir);
            let older = std::fs::read_to_string(log.with_extension("log.1")).unwrap_or_default();
            print!("{older}");
            let mut seen = 0usize;
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                // Rotated: start over on the new file.
                if text.len() < seen {
                    seen = 0;
                }
                print!("{}", &text[seen..]);
                seen = text.len();
                if !follow || !dir.exists() {
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

fn open_netns(path: &Path) -> agentvm::Result<std::sync::Arc<std::os::fd::OwnedFd>> {
    let f = std::fs::File::open(path).map_err(|e| {
        agentvm::Error::Invalid(format!(
            "open the container's network namespace {}: {e}",
            path.display()
        ))
    })?;
    Ok(std::sync::Arc::new(f.into()))
}

/// `agentvm install` / `uninstall`: one line per file (what changed, what to reload), an
/// error naming the file for each that could not be updated; exit status 1 if any failed.
fn install_cmd(a: &InstallArgs, install: bool) -> i32 {
    use agentvm::install::{self as inst, RUNTIME_NAME, RUNTIME_TYPE};
    let mut failed = false;
    let mut fail = |file: &Path, flag: &str, e: agentvm::Error| {
        let hint = match &e {
            agentvm::Error::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                format!("run as root, or pass {flag} PATH")
            }
            agentvm::Error::Invalid(_) => format!(
                "the file was not changed: fix it by hand and run `agentvm {}` again",
                if install { "install" } else { "uninstall" }
            ),
            _ => format!("check {} and run again", file.display()),
        };
        // TOML parse errors span several lines (with a caret under the spot).
        let msg = e.to_string();
        let msg = msg.trim_end();
        let sep = if msg.contains('\n') { "\n" } else { "; " };
        eprintln!("agentvm: error: {msg}{sep}{hint}");
        failed = true;
    };

    if install && a.allow_tcg {
        let p = agentvm::config::path();
        match agentvm::config::HostConfig::set_allow_tcg(&p, true) {
            Ok(changed) => println!(
                "agentvm: TCG software emulation {} for containers in {}",
                if changed {
                    "allowed"
                } else {
                    "already allowed"
                },
                p.display()
            ),
            Err(e) => fail(&p, "AGENTVM_CONFIG=", e),
        }
    }
    let docker = &a.docker_config;
    let docker_result = if install {
        inst::install_docker_runtime(docker)
    } else {
        inst::uninstall_docker_runtime(docker)
    };
    match docker_result {
        Ok(changed) => println!(
            "agentvm: docker: runtime {RUNTIME_NAME:?} ({RUNTIME_TYPE}) {} {}{}",
            match (install, changed) {
                (true, true) => "registered in",
                (true, false) => "already registered in",
                (false, true) => "removed from",
                (false, false) => "not registered in",
            },
            docker.display(),
            if changed {
                "; to take effect: kill -HUP $(pidof dockerd), or restart dockerd"
            } else {
                ""
            }
        ),
        Err(e) => fail(docker, "--docker-config", e),
    }

    let containerd = &a.containerd_config;
    let containerd_result = if install {
        inst::install_containerd_runtime(containerd)
    } else {
        inst::uninstall_containerd_runtime(containerd)
    };
    match containerd_result {
        Ok(edit) => {
            let changed = edit.text.is_some();
            println!(
                "agentvm: containerd: CRI runtime {RUNTIME_NAME:?} {} {}{}",
                match (install, changed) {
                    (true, true) => "registered in",
                    (true, false) => "already registered in",
                    (false, true) => "removed from",
                    (false, false) => "not registered in",
                },
                containerd.display(),
                if changed {
                    format!(
                        " ([{}]{}); to take effect: restart containerd",
                        edit.schema.table(),
                        match (edit.default_runc, install) {
                            (false, _) => "",
                            (true, true) => ", with containerd's default runc runtime written out",
                            (true, false) => ", with the runc runtime install wrote out",
                        }
                    )
                } else {
                    String::new()
                }
            )
        }
        Err(e) => fail(containerd, "--containerd-config", e),
    }
    i32::from(failed)
}

/// `agentvm mcp install` / `uninstall`.
fn mcp_install_cmd(action: McpCmd) -> i32 {
    use agentvm::mcp::install::{self, Outcome};
    let (install, a) = match action {
        McpCmd::Install(a) => (true, a),
        McpCmd::Uninstall(a) => (false, a),
        McpCmd::Host => return 2,
    };
    let Some(config) = a.config.or_else(install::default_config) else {
        eprintln!("agentvm: error: HOME is not set: pass --config PATH");
        return 1;
    };
    let result = if install {
        let command = a
            .command
            .map(Ok)
            .unwrap_or_else(std::env::current_exe)
            .map(|p| p.display().to_string());
        match command {
            Ok(c) => install::install(&config, &c),
            Err(e) => {
                eprintln!(
                    "agentvm: error: cannot find this binary's path: {e}: pass --command PATH"
                );
                return 1;
            }
        }
    } else {
        install::uninstall(&config)
    };
    let name = install::SERVER_NAME;
    match (result, install) {
        (Ok(Outcome::Changed), true) => println!(
            "agentvm: MCP server {name:?} registered in {}; Claude Code starts it in new sessions",
            config.display()
        ),
        (Ok(Outcome::Unchanged), true) => {
            println!("agentvm: MCP server {name:?} already registered in {}", config.display())
        }
        (Ok(Outcome::Changed), false) => {
            println!("agentvm: MCP server {name:?} removed from {}", config.display())
        }
        (Ok(Outcome::Unchanged), false) => {
            println!("agentvm: MCP server {name:?} not registered in {}", config.display())
        }
        (Ok(Outcome::NoConfig), _) => println!(
            "agentvm: {} does not exist: Claude Code is not set up for this user; nothing \
             changed (once it is: `agentvm mcp install`, or `claude mcp add agentvm -- agentvm mcp`)",
            config.display()
        ),
        (Err(e), _) => {
            eprintln!("agentvm: error: {e}");
            return 1;
        }
    }
    0
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<i32> {
    for e in &a.env {
        if !e.contains('=') {
            anyhow::bail!("invalid -e {e:?}: use KEY=VALUE");
        }
    }
    if a.cpus == 0 || a.memory < 64 {
        anyhow::bail!("--cpus must be at least 1 and --memory at least 64 (MiB)");
    }
    // Before anything boots: a missing secret fails here, naming it.
    let asked = std::collections::HashMap::from([
        (
            agentvm::secrets::ANNOTATION.to_string(),
            a.secrets.join(","),
        ),
        (
            agentvm::secrets::ENV_ANNOTATION.to_string(),
            a.secret_env.join(","),
        ),
    ]);
    let secrets = agentvm::secrets::wanted(&asked)?;
    let secrets = if secrets.is_empty() {
        Vec::new()
    } else {
        agentvm::secrets::Store::host().resolve(&secrets)?
    };
    let wanted = image::UserProcess {
        args: a.command,
        env: a.env,
        workdir: a.workdir,
        user: a.user,
    };
    let (rootfs, merged) = match (a.rootfs, a.image) {
        (Some(rootfs), _) => {
            let merged = image::merge(&wanted, &Default::default())?;
            (rootfs, merged)
        }
        (None, Some(reference)) => {
            let (rootfs, config) = image::prepare(&reference)?;
            (rootfs, image::merge(&wanted, &config)?)
        }
        (None, None) => anyhow::bail!("give an IMAGE or --rootfs"),
    };
    let (uid, gid) = match &merged.user {
        Some(u) => run::parse_user(u)?,
        None => (0, 0),
    };
    let opts = RunOptions {
        rootfs,
        process: ProcessSpec {
            args: merged.args,
            env: merged.env,
            cwd: merged.cwd,
            user: User {
                uid,
                gid,
                additional_gids: Vec::new(),
            },
            terminal: a.tty,
            ..Default::default()
        },
        interactive: a.interactive,
        memory_mib: a.memory,
        vcpus: a.cpus,
        accel: a.accel.parse::<AccelChoice>()?,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        icount: a.icount,
        debug: a.debug,
        secrets,
    };
    Ok(run::run(opts).await?)
}
