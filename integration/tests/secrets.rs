//! Secrets end to end: `agentvm secret set` stores one in the host's store (the one the shim
//! reads: /var/lib/agentvm/secrets, key /etc/agentvm/secrets.key), `docker run --runtime=agentvm
//! --annotation io.agentvm.secrets=NAME` gets it at /run/secrets/NAME, and the value is then
//! looked for everywhere on the host it must not be: the bundle, the shim's state dir, Docker's
//! container dir and writable layer, the daemons' logs, `docker inspect`. A missing secret and
//! one stored under another key fail the run, naming the secret, and leave no VM.
//! Needs root and hack/docker-up.sh (hack/test.sh runs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentvm_integration::{agentvm_bin, text, DockerEnv, DOCKER_TIMEOUT};

const T: Duration = DOCKER_TIMEOUT;
/// Where the shim keeps its bundles for Docker's containers (namespace `moby`).
const BUNDLES: &str = "/run/containerd/io.containerd.runtime.v2.task/moby";
/// hack/docker-up.sh's daemon logs.
const DAEMON_LOGS: &str = "/tmp/agentvm-docker-logs";

/// `agentvm secret ARGS` against the host's store (or the one `store` names), stdin `input`.
fn secret_cmd(args: &[&str], input: &[u8], store: Option<&Path>) -> Output {
    use std::io::Write;
    let mut c = Command::new(agentvm_bin());
    c.arg("secret")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = store {
        c.env("AGENTVM_SECRETS_DIR", dir.join("secrets"))
            .env("AGENTVM_SECRETS_KEY", dir.join("secrets.key"));
    } else {
        c.env_remove("AGENTVM_SECRETS_DIR")
            .env_remove("AGENTVM_SECRETS_KEY");
    }
    let mut child = c.spawn().expect("spawn agentvm secret");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write the value");
    agentvm_integration::wait_with_deadline(child, Duration::from_secs(30))
}

/// Removes the test's secrets from the host's store however the test ends.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = secret_cmd(&["rm", name], b"", None);
        }
    }
}

/// Removes a container however the test ends.
struct RemoveContainer(String);

impl Drop for RemoveContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// 32 random hex characters.
fn random_value() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex(s: &str) -> String {
    s.bytes().map(|x| format!("{x:02x}")).collect()
}

/// Regular files under `root` (not following symlinks) holding any of `needles`.
fn files_holding(root: &Path, needles: &[&[u8]], found: &mut Vec<PathBuf>) {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return;
    };
    if meta.is_dir() {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            files_holding(&e.path(), needles, found);
        }
    } else if meta.is_file() && meta.len() < (256 << 20) {
        if let Ok(data) = std::fs::read(root) {
            if needles
                .iter()
                .any(|n| data.windows(n.len()).any(|w| w == *n))
            {
                found.push(root.to_path_buf());
            }
        }
    }
}

fn inspect(env: &DockerEnv, id: &str, format: &str) -> String {
    let out = env.docker(&["inspect", "--format", format, id], None, T);
    assert!(out.status.success(), "{:?}", text(&out));
    text(&out).0.trim().to_string()
}

#[test]
fn secrets_reach_the_container_and_nothing_else() {
    let test = "secrets_reach_the_container_and_nothing_else";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let name = format!("agentvm_it_{}", std::process::id());
    let _cleanup = Cleanup(vec![name.clone()]);
    let value = random_value();

    // Set from stdin, listed by name with no value.
    let out = secret_cmd(&["set", &name], value.as_bytes(), None);
    assert!(out.status.success(), "set: {:?}", text(&out));
    let out = secret_cmd(&["list"], b"", None);
    let (listed, se) = text(&out);
    assert!(out.status.success(), "list: {se}");
    assert!(
        listed.contains(&name) && !listed.contains(&value),
        "{listed}"
    );
    // A name that is no file name is refused before anything is read.
    let out = secret_cmd(&["set", "../escape"], b"v", None);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("invalid secret name"),
        "{:?}",
        text(&out)
    );

    // The key file: root's, 0600.
    use std::os::unix::fs::MetadataExt;
    let key = std::fs::metadata("/etc/agentvm/secrets.key").expect("the key file was made");
    assert_eq!(
        (key.mode() & 0o7777, key.uid()),
        (0o600, 0),
        "key file mode/owner"
    );

    // The workload sees it.
    let image = env.image.clone();
    let ann = format!("io.agentvm.secrets={name}");
    let path = format!("/run/secrets/{name}");
    let (out, id) = env.run(
        "secret-cat",
        &["--rm", "--annotation", &ann, &image, "cat", &path],
        None,
    );
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    assert_eq!(so, value);
    env.assert_vm_gone(&id);

    // A running container (a user of its own, the secret also as a variable): the file is
    // that user's, 0400, on a tmpfs; an exec sees file and variable; the value is nowhere on
    // the host while it runs, nor after.
    let _remove = RemoveContainer(agentvm_integration::unique_name("secret-run"));
    let env_ann = format!("io.agentvm.secrets-env={name}");
    let script = format!(
        "ls -ln {path}; grep ' /run/secrets ' /proc/mounts; \
         test \"$(cat {path})\" = \"${name}\" && echo same; echo ready; sleep 600"
    );
    let (out, id) = env.run(
        "secret-run",
        &[
            "-d",
            "--user",
            "1000:1000",
            "--annotation",
            &ann,
            "--annotation",
            &env_ann,
            &image,
            "sh",
            "-c",
            &script,
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let id = id.trim().to_string();
    let deadline = Instant::now() + T;
    let logs = loop {
        let out = env.docker(&["logs", &id], None, T);
        let (so, se) = text(&out);
        if so.contains("ready") {
            break so;
        }
        assert!(Instant::now() < deadline, "no ready: {so} {se}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let ls = logs.lines().next().unwrap_or_default();
    assert!(
        ls.starts_with("-r--------") && ls.contains(" 1000 "),
        "{logs}"
    );
    assert!(logs.contains("tmpfs") && logs.contains(" ro,"), "{logs}");
    assert!(
        logs.contains("same"),
        "the variable is the file's value: {logs}"
    );
    let check =
        format!("test \"$(cat {path})\" = \"${name}\" && test ${{#{name}}} = 32 && echo exec-same");
    let out = env.docker(&["exec", &id, "sh", "-c", &check], None, T);
    assert_eq!(text(&out).0, "exec-same\n", "{:?}", text(&out));

    let wire = hex(&value);
    let needles: [&[u8]; 2] = [value.as_bytes(), wire.as_bytes()];
    let upper = inspect(&env, &id, "{{.GraphDriver.Data.UpperDir}}");
    let dirs = [
        PathBuf::from(BUNDLES).join(&id),
        PathBuf::from("/run/agentvm").join(&id),
        PathBuf::from("/var/lib/docker/containers").join(&id),
        PathBuf::from(&upper),
        PathBuf::from(DAEMON_LOGS),
    ];
    assert!(
        dirs[0].join("config.json").is_file(),
        "the bundle is where expected"
    );
    assert!(dirs[1].is_dir(), "the state dir is where expected");
    assert!(Path::new(&upper).is_dir(), "the writable layer {upper}");
    let mut found = Vec::new();
    for d in &dirs {
        files_holding(d, &needles, &mut found);
    }
    assert!(
        found.is_empty(),
        "the secret's value is on the host in {found:?}"
    );
    let inspected = env.docker(&["inspect", &id], None, T);
    let (shown, _) = text(&inspected);
    assert!(
        shown.contains(&format!("\"io.agentvm.secrets\": \"{name}\"")),
        "docker inspect shows the annotation: {shown}"
    );
    assert!(!shown.contains(&value) && !shown.contains(&wire), "{shown}");

    let out = env.docker(&["rm", "-f", &id], None, T);
    assert!(out.status.success(), "{:?}", text(&out));
    env.assert_vm_gone(&id);
    found.clear();
    for d in &dirs[3..] {
        files_holding(d, &needles, &mut found);
    }
    assert!(
        found.is_empty(),
        "the secret's value is on the host in {found:?}"
    );
}

#[test]
fn a_missing_or_undecryptable_secret_fails_the_run_and_leaves_no_vm() {
    let test = "a_missing_or_undecryptable_secret_fails_the_run_and_leaves_no_vm";
    let Some(env) = DockerEnv::get(test) else {
        return;
    };
    let image = env.image.clone();
    let missing = format!("agentvm_it_missing_{}", std::process::id());
    let ann = format!("io.agentvm.secrets={missing}");
    let (out, id) = env.run(
        "secret-missing",
        &["--rm", "--annotation", &ann, &image, "true"],
        None,
    );
    let (_, se) = text(&out);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        se.contains(&missing) && se.contains("is not set"),
        "the error names the secret: {se}"
    );
    env.assert_vm_gone(id.trim());

    // Stored with another key: a store of its own, its file copied into the host's store.
    let wrong = format!("agentvm_it_wrongkey_{}", std::process::id());
    let _cleanup = Cleanup(vec![wrong.clone()]);
    let other = tempfile::tempdir().unwrap();
    let out = secret_cmd(&["set", &wrong], b"value", Some(other.path()));
    assert!(out.status.success(), "{:?}", text(&out));
    // The host store exists (made by a set) before a file is put in it.
    let out = secret_cmd(&["set", &wrong], b"placeholder", None);
    assert!(out.status.success(), "{:?}", text(&out));
    let host_file = Path::new("/var/lib/agentvm/secrets").join(&wrong);
    std::fs::copy(other.path().join("secrets").join(&wrong), &host_file).unwrap();
    let ann = format!("io.agentvm.secrets={wrong}");
    let (out, id) = env.run(
        "secret-wrongkey",
        &["--rm", "--annotation", &ann, &image, "true"],
        None,
    );
    let (_, se) = text(&out);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        se.contains(&wrong) && se.contains("does not decrypt"),
        "the error names the secret and says why: {se}"
    );
    env.assert_vm_gone(id.trim());
}

/// `agentvm run --secret/--secret-env` (no Docker): the same store and delivery.
#[test]
fn agentvm_run_gets_secrets_as_file_and_variable() {
    let test = "agentvm_run_gets_secrets_as_file_and_variable";
    let Some(vm) = agentvm_integration::VmEnv::get(test) else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let value = random_value();
    let out = secret_cmd(&["set", "API_TOKEN"], value.as_bytes(), Some(store.path()));
    assert!(out.status.success(), "{:?}", text(&out));
    let mut c = vm.run_cmd(&[
        "--user",
        "1000:1000",
        "--secret",
        "API_TOKEN",
        "--secret-env",
        "API_TOKEN",
        "--",
        "sh",
        "-c",
        "ls -ln /run/secrets; cat /run/secrets/API_TOKEN; echo; echo \"$API_TOKEN\"",
    ]);
    c.env("AGENTVM_SECRETS_DIR", store.path().join("secrets"))
        .env("AGENTVM_SECRETS_KEY", store.path().join("secrets.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = agentvm_integration::wait_with_deadline(c.spawn().unwrap(), T);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {se}");
    let lines: Vec<&str> = so.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("-r--------") && l.contains(" 1000 ")),
        "{so}"
    );
    assert_eq!(
        &lines[lines.len() - 2..],
        [value.as_str(), value.as_str()],
        "{so}"
    );
    vm.assert_clean();

    // A secret that is not there: refused before a VM boots, naming it.
    let mut c = vm.run_cmd(&["--secret", "NOT_THERE", "--", "true"]);
    c.env("AGENTVM_SECRETS_DIR", store.path().join("secrets"))
        .env("AGENTVM_SECRETS_KEY", store.path().join("secrets.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = agentvm_integration::wait_with_deadline(c.spawn().unwrap(), T);
    let (_, se) = text(&out);
    assert_eq!(out.status.code(), Some(125), "{se}");
    assert!(se.contains("\"NOT_THERE\" is not set"), "{se}");
    vm.assert_clean();
}
