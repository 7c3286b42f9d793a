//! Registry references, pulled with `oci-client`.
//!
//! Manifests and configs are read into memory (bounded) and checked against their
//! digests; layer blobs are downloaded into the build's private work dir, checked against
//! the manifest's digest and size, and renamed into the cache's blob store
//! (`<cache>/blobs/sha256/<hex>`), where later builds of images sharing a layer find them.
//! Plain HTTP is used for loopback registries (as Docker does) and for those named as
//! insecure; credentials come from the Docker config file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Once;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};

use crate::digest;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `HOST[:PORT]` of registries to reach over plain HTTP (loopback ones always are).
    pub insecure: Vec<String>,
    /// The Docker config file with credentials; default `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`.
    pub auth_file: Option<PathBuf>,
}

/// Manifest media types we accept.
const ACCEPT: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Layer blobs downloaded at once.
const PARALLEL: usize = 3;

/// Parses and normalises a registry reference (`alpine` → `docker.io/library/alpine:latest`).
pub fn normalize(s: &str) -> Result<String> {
    parse(s).map(|r| r.whole())
}

fn parse(s: &str) -> Result<Reference> {
    s.parse::<Reference>().map_err(|e| {
        Error::Source(format!(
            "malformed image reference {s:?}: {e} (expected [REGISTRY[:PORT]/]NAME[:TAG][@DIGEST], \
             or docker-archive:PATH, oci-archive:PATH, oci:DIR, docker-daemon:NAME)"
        ))
    })
}

/// Whether `registry` (`host[:port]`) is on loopback: `localhost`, 127.0.0.0/8, `::1`.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                registry
            }
        })
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Names under which a registry's credentials may be filed in the Docker config.
fn auth_keys(registry: &str) -> Vec<String> {
    let mut v = vec![registry.to_owned()];
    if matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        v.extend(
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "docker.io",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
    }
    v
}

/// Strips a scheme and path from a Docker config `auths` key.
fn auth_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Credentials for `registry` from a Docker config file (`auths.<registry>.auth`,
/// base64 `user:password`). Anonymous when there are none.
pub fn docker_auth(config: &[u8], registry: &str) -> Result<RegistryAuth> {
    let doc: serde_json::Value = serde_json::from_slice(config).map_err(|source| Error::Json {
        what: "Docker config file".into(),
        source,
    })?;
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    for want in auth_keys(registry) {
        for (k, v) in auths {
            if k != &want && auth_host(k) != want {
                continue;
            }
            if let Some(b64) = v.get("auth").and_then(|a| a.as_str()) {
                let raw = base64_decode(b64).ok_or_else(|| {
                    Error::Source(format!(
                        "the Docker config's auth for {k} is not valid base64 (log in again)"
                    ))
                })?;
                let s = String::from_utf8(raw).map_err(|_| {
                    Error::Source(format!("the Docker config's auth for {k} is not UTF-8"))
                })?;
                let (user, pass) = s.split_once(':').ok_or_else(|| {
                    Error::Source(format!(
                        "the Docker config's auth for {k} is not user:password (log in again)"
                    ))
                })?;
                return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
            }
            if let (Some(u), Some(p)) = (
                v.get("username").and_then(|a| a.as_str()),
                v.get("password").and_then(|a| a.as_str()),
            ) {
                return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
            }
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn default_auth_file() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Installs rustls' ring provider as the process default (reqwest needs one).
pub(crate) fn install_crypto() {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only when another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A connection to one repository of one registry.
pub(crate) struct Remote {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    /// Plain HTTP?
    http: bool,
    auth: RegistryAuth,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("reference", &self.reference.whole())
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

fn net_err(
    what: String,
    r: &Reference,
    http: bool,
) -> impl Fn(oci_client::errors::OciDistributionError) -> Error {
    use oci_client::errors::OciDistributionError as E;
    let registry = r.registry().to_owned();
    move |e| {
        let hint = match &e {
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => format!(
                " (the registry wants credentials: run `docker login {registry}`; they are read \
                 from auths.\"{registry}\".auth in $DOCKER_CONFIG/config.json or \
                 ~/.docker/config.json)"
            ),
            E::ImageManifestNotFoundError(_) => {
                " (no such image or tag: check the name and tag)".to_owned()
            }
            E::RequestError(_) if !http => format!(
                " (is the registry reachable? If {registry} serves plain HTTP, pass \
                 --insecure-registry {registry})"
            ),
            E::RequestError(_) => " (is the registry running and reachable?)".to_owned(),
            _ => String::new(),
        };
        // reqwest hides the cause (connection refused, TLS) in its source chain.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let s_msg = s.to_string();
            if !msg.contains(&s_msg) {
                msg.push_str(": ");
                msg.push_str(&s_msg);
            }
            src = s.source();
        }
        Error::Source(format!("{what}: {msg}{hint}"))
    }
}

impl Remote {
    /// Parses `s`, reads credentials and prepares a client (no network traffic yet).
    pub(crate) fn connect(s: &str, opts: &RegistryOptions) -> Result<Self> {
        install_crypto();
        let reference = parse(s)?;
        let registry = reference.resolve_registry().to_owned();
        let http = is_loopback(&registry)
            || opts
                .insecure
                .iter()
                .any(|h| h == &registry || h == reference.registry());
        let config = ClientConfig {
            protocol: if http {
                ClientProtocol::HttpsExcept(vec![registry.clone()])
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        };
        let client = Client::new(config);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the registry client runtime", e))?;
        let auth = match opts.auth_file.clone().or_else(default_auth_file) {
            Some(p) => match std::fs::read(&p) {
                Ok(raw) => docker_auth(&raw, reference.registry())
                    .map_err(|e| Error::Source(format!("{}: {e}", p.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryAuth::Anonymous,
                Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
            },
            None => RegistryAuth::Anonymous,
        };
        let remote = Remote {
            rt,
            client,
            reference,
            http,
            auth,
        };
        remote
            .rt
            .block_on(
                remote
                    .client
                    .auth(&remote.reference, &remote.auth, RegistryOperation::Pull),
            )
            .map_err(net_err(
                format!("authenticating to {}", remote.reference.registry()),
                &remote.reference,
                http,
            ))?;
        Ok(remote)
    }

    /// Fetches a manifest or index: the reference's own (tag or digest) when `digest` is
    /// `None`. Returns its bytes and digest; the digest is checked when one is known.
    pub(crate) fn manifest(&self, digest: Option<&str>, max: u64) -> Result<(Vec<u8>, String)> {
        let r = match digest {
            Some(d) => self.reference.clone_with_digest(d.to_owned()),
            None => self.reference.clone(),
        };
        let (raw, _) = self
            .rt
            .block_on(self.client.pull_manifest_raw(&r, &self.auth, &ACCEPT))
            .map_err(net_err(
                format!("fetching manifest of {}", r.whole()),
                &r,
                self.http,
            ))?;
        if raw.len() as u64 > max {
            return Err(Error::Source(format!(
                "manifest of {} is larger than {max} bytes",
                r.whole()
            )));
        }
        let actual = digest::sha256(&raw);
        if let Some(want) = digest.or(r.digest()) {
            digest::verify(format!("manifest of {}", r.whole()), want, &actual)?;
        }
        Ok((raw.to_vec(), actual))
    }

    /// Fetches a small blob (a config) into memory, checked against `d`.
    pub(crate) fn small_blob(&self, d: &str, max: u64) -> Result<Vec<u8>> {
        digest::parse(d)?;
        let desc = OciDescriptor {
            digest: d.to_owned(),
            ..Default::default()
        };
        let out = self.rt.block_on(async {
            let mut s = self.client.pull_blob_stream(&self.reference, &desc).await?;
            let mut v = Vec::new();
            while let Some(chunk) = s.next().await {
                v.extend_from_slice(&chunk?);
                if v.len() as u64 > max {
                    break;
                }
            }
            Ok::<_, oci_client::errors::OciDistributionError>(v)
        });
        let v = out.map_err(net_err(
            format!("fetching blob {d}"),
            &self.reference,
            self.http,
        ))?;
        if v.len() as u64 > max {
            return Err(Error::Source(format!(
                "blob {d} is larger than {max} bytes"
            )));
        }
        digest::verify(format!("blob {d}"), d, &digest::sha256(&v))?;
        Ok(v)
    }

    /// Downloads the layer blobs missing from `store` (`<store>/blobs/sha256/<hex>`),
    /// each into `scratch` first, checked, then renamed into place.
    pub(crate) fn fetch(
        &self,
        blobs: &[(usize, String, Option<u64>)],
        total: usize,
        store: &Path,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        let dir = store.join("blobs/sha256");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        self.rt.block_on(async {
            let mut jobs =
                futures_util::stream::iter(blobs.iter().map(|(i, d, size)| {
                    self.fetch_one(*i, total, d, *size, &dir, scratch, progress)
                }))
                .buffer_unordered(PARALLEL);
            while let Some(r) = jobs.next().await {
                r?;
            }
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_one(
        &self,
        index: usize,
        total: usize,
        d: &str,
        size: Option<u64>,
        dir: &Path,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        let hex = digest::parse(d)?;
        let dest = dir.join(hex);
        if dest.is_file() {
            return Ok(());
        }
        let size =
            size.ok_or_else(|| Error::Source(format!("the manifest gives no size for layer {d}")))?;
        progress.fetch_start(index, total, d, Some(size));
        let tmp = scratch.join(format!("blob-{hex}"));
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        let desc = OciDescriptor {
            digest: d.to_owned(),
            size: size as i64,
            ..Default::default()
        };
        let what = format!("downloading layer {d}");
        let err = net_err(what.clone(), &self.reference, self.http);
        let mut s = self
            .client
            .pull_blob_stream(&self.reference, &desc)
            .await
            .map_err(&err)?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| Error::Source(format!("{what}: {e}")))?;
            n += chunk.len() as u64;
            if n > size {
                return Err(Error::Source(format!(
                    "layer {d} is larger than the {size} bytes its manifest says (corrupt or \
                     tampered image)"
                )));
            }
            h.update(&chunk);
            f.write_all(&chunk)
                .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
            progress.fetch_progress(index, n);
        }
        if n != size {
            return Err(Error::Source(format!(
                "layer {d} is {n} bytes, the manifest says {size} (truncated download?)"
            )));
        }
        digest::verify(
            format!("layer blob {d}"),
            d,
            &format!("sha256:{}", digest::hex(&h.finalize())),
        )?;
        f.sync_all()
            .map_err(|e| Error::io(format!("sync {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &dest)
            .map_err(|e| Error::io(format!("store {}", dest.display()), e))?;
        progress.fetch_done(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for r in [
            "localhost",
            "localhost:5000",
            "LOCALHOST:5000",
            "127.0.0.1:5000",
            "127.9.8.7",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "index.docker.io",
            "10.0.0.1:5000",
            "localhost.example.com:5000",
            "[::2]:5000",
            "128.0.0.1",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn normalises_docker_hub_names() {
        assert_eq!(
            normalize("alpine").unwrap(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(normalize("alpine:3").unwrap(), "docker.io/library/alpine:3");
        assert_eq!(
            normalize("docker.io/library/alpine:3").unwrap(),
            "docker.io/library/alpine:3"
        );
        assert_eq!(
            normalize("index.docker.io/foo/bar").unwrap(),
            "docker.io/foo/bar:latest"
        );
        assert_eq!(
            normalize("localhost:5000/busybox:latest").unwrap(),
            "localhost:5000/busybox:latest"
        );
        assert!(normalize("foo@sha256:xyz").is_err());
        assert_eq!(
            parse("alpine:3").unwrap().resolve_registry(),
            "index.docker.io"
        );
    }

    #[test]
    fn docker_config_auth() {
        // "user:pa:ss" base64
        let cfg = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "localhost:5000": {"auth": "dXNlcjpwYTpzcw=="},
            "https://reg.example.com/v2/": {"username": "u", "password": "p"}
        }}"#;
        assert_eq!(
            docker_auth(cfg, "localhost:5000").unwrap(),
            RegistryAuth::Basic("user".into(), "pa:ss".into())
        );
        assert_eq!(
            docker_auth(cfg, "docker.io").unwrap(),
            RegistryAuth::Basic("hub".into(), "secret".into())
        );
        assert_eq!(
            docker_auth(cfg, "reg.example.com").unwrap(),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        assert_eq!(
            docker_auth(cfg, "other:5000").unwrap(),
            RegistryAuth::Anonymous
        );
        assert_eq!(docker_auth(b"{}", "x").unwrap(), RegistryAuth::Anonymous);
        assert!(docker_auth(br#"{"auths":{"x":{"auth":"!!"}}}"#, "x").is_err());
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a*b").is_none());
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod e2e;
