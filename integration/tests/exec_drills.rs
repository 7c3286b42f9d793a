//! A failing or hung `docker exec` never ends the container: an exec whose client is killed or
//! times out, whose process is killed (by itself or by another exec), or that cannot start
//! leaves the init running (`docker inspect` says running) and the next exec works. The same
//! drill runs under runc and under agentvm, side by side, and what each step shows must match
//! (runc is the reference). Needs hack/docker-up.sh.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_integration::{text, unique_name, DockerEnv};

const T: Duration = Duration::from_secs(180);

fn docker(env: &DockerEnv, args: &[&str]) -> (Option<i32>, String) {
    let out = env.docker(args, None, T);
    let (so, se) = text(&out);
    (out.status.code(), format!("{so}{se}"))
}

/// Whether the container is still running, and whether a fresh exec in it works.
fn alive(env: &DockerEnv, name: &str) -> String {
    let (_, running) = docker(env, &["inspect", "-f", "{{.State.Running}}", name]);
    let (code, out) = docker(env, &["exec", name, "echo", "next-exec"]);
    format!(
        "running={} next-exec={}",
        running.trim(),
        code == Some(0) && out.trim() == "next-exec"
    )
}

/// Waits until `script` (run by exec) prints `want`, up to 60 s; returns what it printed.
fn wait_for(env: &DockerEnv, name: &str, script: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out) = docker(env, &["exec", name, "sh", "-c", script]);
        if out.trim() == want || Instant::now() > deadline {
            return out.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts `docker exec ARGS` in the background (stdin a pipe kept open when `stdin_open`).
fn spawn_exec(args: &[&str], stdin_open: bool) -> std::process::Child {
    Command::new("docker")
        .arg("exec")
        .args(args)
        .stdin(if stdin_open {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn docker exec")
}

/// Starts container `name` running `cmd` under `runtime` and waits until exec works in it
/// (the VM boots under TCG).
fn start(env: &DockerEnv, runtime: &str, name: &str, cmd: &[&str]) {
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        runtime,
        "--name",
        name,
        &env.image,
    ];
    args.extend_from_slice(cmd);
    let (code, out) = docker(env, &args);
    assert_eq!(code, Some(0), "{runtime}: docker run: {out}");
    let first = wait_for(env, name, "echo up", "up");
    assert_eq!(first, "up", "{runtime}: the container never answered exec");
}

/// The drill against one runtime: what each step showed, in order.
fn drill(env: &DockerEnv, runtime: &str) -> Vec<(String, String)> {
    let name = unique_name(&format!("execdrill-{runtime}"));
    let mut seen = Vec::new();
    start(env, runtime, &name, &["sleep", "600"]);

    // 1. The client of a hung exec is killed (SIGKILL): the exec's process is not the
    //    client's, it keeps running; the container runs on.
    let mut client = spawn_exec(
        &[&name, "sh", "-c", "echo $$ > /tmp/hung1; exec sleep 1001"],
        false,
    );
    exec_started(env, &name, "/tmp/hung1", runtime);
    client.kill().unwrap();
    let _ = client.wait();
    std::thread::sleep(Duration::from_secs(1));
    seen.push(("client SIGKILLed".into(), alive(env, &name)));
    let (_, ps) = docker(env, &["exec", &name, "ps", "-o", "args"]);
    seen.push((
        "its process after the client died".into(),
        format!("still there={}", ps.contains("sleep 1001")),
    ));

    // 2. A client that times out (`timeout 3 docker exec -i`, stdin left open).
    let (code, _) = {
        let out = Command::new("timeout")
            .args(["3", "docker", "exec", "-i", &name, "sleep", "1002"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("timeout docker exec");
        (out.status.code(), ())
    };
    seen.push((
        "client timed out".into(),
        format!("client={code:?} {}", alive(env, &name)),
    ));

    // 3. An exec's process killed by another exec: the first client sees 137.
    let mut victim = spawn_exec(
        &[&name, "sh", "-c", "echo $$ > /tmp/victim; exec sleep 1003"],
        false,
    );
    exec_started(env, &name, "/tmp/victim", runtime);
    let (code, out) = docker(
        env,
        &["exec", &name, "sh", "-c", "kill -9 $(cat /tmp/victim)"],
    );
    assert_eq!(code, Some(0), "{runtime}: kill: {out}");
    let status = wait_child(&mut victim, Duration::from_secs(60));
    seen.push((
        "exec killed by another exec".into(),
        format!("client={status:?} {}", alive(env, &name)),
    ));

    // 4. An exec that kills itself, one that fails to start, one that exits with an error.
    let (code, _) = docker(env, &["exec", &name, "sh", "-c", "kill -9 $$"]);
    seen.push((
        "exec SIGKILLs itself".into(),
        format!("{code:?} {}", alive(env, &name)),
    ));
    let (code, _) = docker(env, &["exec", &name, "/no/such/binary"]);
    seen.push((
        "exec of a missing binary".into(),
        format!("{code:?} {}", alive(env, &name)),
    ));
    let (code, _) = docker(env, &["exec", &name, "sh", "-c", "exit 255"]);
    seen.push((
        "exec exits 255".into(),
        format!("{code:?} {}", alive(env, &name)),
    ));

    // 5. An exec with a terminal whose client is killed.
    let mut tty = spawn_exec(&["-it", &name, "sh"], true);
    std::thread::sleep(Duration::from_secs(2));
    tty.kill().unwrap();
    let _ = tty.wait();
    seen.push(("tty exec client SIGKILLed".into(), alive(env, &name)));

    // The init is the same process all along.
    let (_, started) = docker(
        env,
        &[
            "inspect",
            "-f",
            "{{.State.StartedAt}} {{.RestartCount}}",
            &name,
        ],
    );
    let (code, out) = docker(env, &["rm", "-f", &name]);
    assert_eq!(code, Some(0), "{runtime}: rm: {out}");
    seen.push((
        "init never restarted".into(),
        format!(
            "restarts={}",
            started.split_whitespace().nth(1).unwrap_or("?")
        ),
    ));

    // 6. The init exits while an exec runs: the exec is killed with the container (137, as
    //    the kernel's PID-namespace teardown does under runc), reported before the init.
    let name = unique_name(&format!("execdrill-end-{runtime}"));
    start(
        env,
        runtime,
        &name,
        &[
            "sh",
            "-c",
            "while [ ! -e /tmp/go ]; do sleep 0.2; done; exit 3",
        ],
    );
    let mut running = spawn_exec(
        &[&name, "sh", "-c", "echo $$ > /tmp/x; exec sleep 1004"],
        false,
    );
    exec_started(env, &name, "/tmp/x", runtime);
    let (code, out) = docker(env, &["exec", &name, "touch", "/tmp/go"]);
    assert_eq!(code, Some(0), "{runtime}: touch: {out}");
    let exec_code = wait_child(&mut running, Duration::from_secs(60));
    let (_, init_code) = docker(env, &["wait", &name]);
    seen.push((
        "the init exits under a running exec".into(),
        format!("exec={exec_code:?} init={}", init_code.trim()),
    ));
    let (code, out) = docker(env, &["rm", "-f", &name]);
    assert_eq!(code, Some(0), "{runtime}: rm: {out}");
    seen
}

/// Waits until the exec that writes its pid to `file` has started.
fn exec_started(env: &DockerEnv, name: &str, file: &str, runtime: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while docker(env, &["exec", name, "test", "-s", file]).0 != Some(0) {
        assert!(
            Instant::now() < deadline,
            "{runtime}: the exec writing {file} never started"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_child(c: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_failing_or_hung_exec_never_ends_the_container() {
    let Some(env) = DockerEnv::get("a_failing_or_hung_exec_never_ends_the_container") else {
        return;
    };
    let (runc, agentvm) = std::thread::scope(|s| {
        let r = s.spawn(|| drill(&env, "runc"));
        let a = s.spawn(|| drill(&env, "agentvm"));
        (r.join().unwrap(), a.join().unwrap())
    });
    for (i, (step, seen)) in runc.iter().enumerate() {
        eprintln!("{step}: runc {seen} | agentvm {}", agentvm[i].1);
    }
    for ((step, r), (_, a)) in runc.iter().zip(&agentvm) {
        assert!(
            r.contains("running=true next-exec=true") || !r.contains("running="),
            "runc itself: {step}: {r}"
        );
        assert_eq!(a, r, "{step}: agentvm differs from runc");
    }
}
