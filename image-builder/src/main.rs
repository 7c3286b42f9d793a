//! `agentvm-image`: OCI images to cached ext4 root filesystems.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use agentvm_image::cache::{self, Cache};
use agentvm_image::{BuildOptions, ImageRef, Limits, Platform, Progress, RegistryOptions};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "agentvm-image",
    version,
    about = "Build OCI images into bootable ext4 root filesystems"
)]
struct Cli {
    /// Cache directory (default: $AGENTVM_IMAGE_CACHE or /var/cache/agentvm/images).
    #[arg(long, global = true)]
    cache: Option<PathBuf>,
    /// Print only results, no progress.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or fetch from the cache) the ext4 of an image and print its path.
    Build {
        /// A registry reference (localhost:5000/app:1, alpine:3, docker.io/library/alpine:3),
        /// docker-archive:PATH[:NAME], oci-archive:PATH[:TAG], oci:DIR[:TAG] or
        /// docker-daemon:NAME.
        reference: String,
        /// Also copy the ext4 here.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Image size (bytes, or with K/M/G suffix) instead of the computed one.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Platform to pick from a multi-platform image, e.g. linux/arm64.
        #[arg(long)]
        platform: Option<String>,
        /// Largest total uncompressed layer size accepted (bytes or K/M/G).
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        /// Reach this registry (HOST[:PORT]) over plain HTTP; repeatable. Loopback
        /// registries (localhost, 127.0.0.0/8, ::1) always are.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// List cached images.
    Ls,
    /// Show an image's config (Entrypoint, Cmd, Env, WorkingDir, User).
    Inspect {
        /// The image reference.
        reference: String,
        /// Platform to pick from a multi-platform image.
        #[arg(long)]
        platform: Option<String>,
        /// Reach this registry (HOST[:PORT]) over plain HTTP; repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
        /// Print the config as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget an image; its ext4 goes when no other reference uses it.
    Rm {
        /// The image reference, as given to build.
        reference: String,
    },
    /// Remove unreferenced images and leftovers of interrupted builds.
    Prune,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size like 512M or 4G"))
}

/// indicatif bars on a terminal, plain lines otherwise, nothing with --quiet.
struct Reporter {
    mode: Mode,
    bar: Mutex<Option<ProgressBar>>,
    /// One bar per layer download in flight.
    multi: MultiProgress,
    fetches: Mutex<HashMap<usize, ProgressBar>>,
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

#[derive(PartialEq)]
enum Mode {
    Quiet,
    Plain,
    Bars,
}

impl Progress for Reporter {
    fn phase(&self, msg: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => eprintln!("{msg}"),
            Mode::Bars => {
                let pb = self.multi.add(ProgressBar::new_spinner());
                pb.set_message(msg.to_owned());
                pb.enable_steady_tick(std::time::Duration::from_millis(120));
                if let Some(old) = self.bar.lock().expect("poisoned").replace(pb) {
                    old.finish_and_clear();
                }
            }
        }
    }

    fn layer_start(&self, index: usize, total: usize, digest: &str, size: Option<u64>) {
        let msg = format!("layer {}/{total} {}", index + 1, short(digest));
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => eprintln!("{msg}"),
            Mode::Bars => {
                let pb = self.multi.add(match size {
                    Some(n) => ProgressBar::new(n).with_style(
                        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                            .expect("valid template"),
                    ),
                    None => ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template("{spinner} {msg} {bytes}")
                            .expect("valid template"),
                    ),
                });
                pb.set_message(msg);
                if let Some(old) = self.bar.lock().expect("poisoned").replace(pb) {
                    old.finish_and_clear();
                }
            }
        }
    }

    fn layer_progress(&self, bytes: u64) {
        if let Some(pb) = self.bar.lock().expect("poisoned").as_ref() {
            pb.set_position(bytes);
        }
    }

    fn layer_done(&self) {
        if let Some(pb) = self.bar.lock().expect("poisoned").take() {
            pb.finish_and_clear();
        }
    }

    fn fetch_start(&self, index: usize, total: usize, digest: &str, size: Option<u64>) {
        let msg = format!("pull {}/{total} {}", index + 1, short(digest));
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => eprintln!("{msg}"),
            Mode::Bars => {
                let pb = self.multi.add(
                    ProgressBar::new(size.unwrap_or(0)).with_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .expect("valid template"),
                    ),
                );
                pb.set_message(msg);
                self.fetches.lock().expect("poisoned").insert(index, pb);
            }
        }
    }

    fn fetch_progress(&self, index: usize, bytes: u64) {
        if let Some(pb) = self.fetches.lock().expect("poisoned").get(&index) {
            pb.set_position(bytes);
        }
    }

    fn fetch_done(&self, index: usize) {
        if let Some(pb) = self.fetches.lock().expect("poisoned").remove(&index) {
            pb.finish_and_clear();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(pb) = b.take() {
                pb.finish_and_clear();
            }
        }
        if let Ok(mut f) = self.fetches.lock() {
            for (_, pb) in f.drain() {
                pb.finish_and_clear();
            }
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cache_dir = cli.cache.clone().unwrap_or_else(cache::default_dir);
    let reporter = Reporter {
        mode: if cli.quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Plain
        },
        bar: Mutex::new(None),
        multi: MultiProgress::new(),
        fetches: Mutex::new(HashMap::new()),
    };
    match cli.cmd {
        Cmd::Build {
            reference,
            output,
            size,
            platform,
            max_size,
            insecure_registry,
        } => {
            let r = ImageRef::parse(&reference)?;
            let platform = platform.as_deref().map(Platform::parse).transpose()?;
            let mut limits = Limits::default();
            if let Some(m) = max_size {
                limits.max_total_size = m;
            }
            let opts = BuildOptions {
                size,
                platform: platform.as_ref(),
                limits: &limits,
                progress: &reporter,
                registry: &RegistryOptions {
                    insecure: insecure_registry,
                    auth_file: None,
                },
                ..BuildOptions::new(&cache_dir)
            };
            let built = agentvm_image::build(&r, &opts)
                .map_err(|e| full_disk_hint(e.into(), &cache_dir))
                .with_context(|| format!("building {reference}"))?;
            drop(reporter);
            if let Some(out) = output {
                copy_sparse(&built.rootfs, &out)?;
                println!("{}", out.display());
            } else {
                println!("{}", built.rootfs.display());
            }
        }
        Cmd::Ls => {
            let cache = Cache::open(&cache_dir)?;
            println!("{:<50} {:<14} {:>10}", "REFERENCE", "KEY", "SIZE");
            for r in cache.refs()? {
                let size = cache
                    .image_record(&r.key)
                    .map(|i| format!("{}M", i.size >> 20))
                    .unwrap_or_else(|| "missing".into());
                println!(
                    "{:<50} {:<14} {:>10}",
                    r.reference,
                    &r.key[..12.min(r.key.len())],
                    size
                );
            }
        }
        Cmd::Inspect {
            reference,
            platform,
            insecure_registry,
            json,
        } => {
            let r = ImageRef::parse(&reference)?;
            let platform = platform.as_deref().map(Platform::parse).transpose()?;
            let registry = RegistryOptions {
                insecure: insecure_registry,
                auth_file: None,
            };
            let opts = BuildOptions {
                platform: platform.as_ref(),
                registry: &registry,
                ..BuildOptions::new(&cache_dir)
            };
            let (cfg, rootfs) = agentvm_image::inspect(&r, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                let c = &cfg.config;
                println!("Platform:   {}/{}", cfg.os, cfg.architecture);
                println!("Entrypoint: {}", serde_json::to_string(&c.entrypoint)?);
                println!("Cmd:        {}", serde_json::to_string(&c.cmd)?);
                println!("WorkingDir: {}", c.working_dir.as_deref().unwrap_or(""));
                println!("User:       {}", c.user.as_deref().unwrap_or(""));
                println!("Env:");
                for e in c.env.iter().flatten() {
                    println!("  {e}");
                }
                println!("Layers:     {}", cfg.rootfs.diff_ids.len());
                match rootfs {
                    Some(p) => println!("Rootfs:     {}", p.display()),
                    None => println!("Rootfs:     (not built)"),
                }
            }
        }
        Cmd::Rm { reference } => {
            let cache = Cache::open(&cache_dir)?;
            let canonical = ImageRef::parse(&reference)?.to_string();
            if !cache.remove_ref(&canonical)? {
                anyhow::bail!("{reference} is not in the cache (see agentvm-image ls)");
            }
        }
        Cmd::Prune => {
            let n = Cache::open(&cache_dir)?.prune()?;
            println!("removed {n} entries");
        }
    }
    Ok(())
}

/// Adds what to do when the cache filesystem filled up (ENOSPC anywhere in the chain).
fn full_disk_hint(e: anyhow::Error, cache_dir: &std::path::Path) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
            || c.to_string().contains("No space left on device")
    });
    if full {
        e.context(format!(
            "the cache filesystem ({}) is full; nothing was published. Free space there, \
             run `agentvm-image prune`, or use --cache / AGENTVM_IMAGE_CACHE on a larger disk",
            cache_dir.display()
        ))
    } else {
        e
    }
}

/// Copies the ext4 keeping it sparse: zero blocks become holes, then rename into place.
fn copy_sparse(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = std::fs::File::open(from).with_context(|| format!("open {}", from.display()))?;
    let tmp = to.with_extension("partial");
    let mut dst =
        std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
    }
    dst.set_len(len)?;
    dst.sync_all()?;
    std::fs::rename(&tmp, to).with_context(|| format!("rename to {}", to.display()))?;
    Ok(())
}
