//! What Docker shows of a container's processes is the host's, never the guest's word
//! (issue 11, item 7): every exec reports the container's task pid (the namespace holder, a
//! host process), and execs keep working while another one runs.
//!
//! The fake-agent cases (a forged `Started{pid:1}`, a forged OOM, a stalled connection, a
//! 1 MiB error) need an agent that lies, so they are unit tests over socketpairs: runtime
//! `container::tests` and shim `task::tests::hostile_agent`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agentvm_integration::{text, unique_name, DockerEnv};

const T: Duration = Duration::from_secs(120);

/// GET `path` from dockerd's API; the response body.
fn docker_api(path: &str) -> String {
    let mut s = UnixStream::connect("/var/run/docker.sock").expect("connect to dockerd");
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// The number after `"key":` in a JSON text (the first occurrence).
fn json_number(json: &str, key: &str) -> i64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    let digits: String = json[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

#[test]
fn exec_pids_are_the_task_pid_never_the_guests() {
    let Some(env) = DockerEnv::get("exec_pids_are_the_task_pid_never_the_guests") else {
        return;
    };
    let n = unique_name("hostile-pids");
    let image = env.image.clone();
    let (out, id) = env.run("hostile-pids", &["-d", &image, "sleep", "300"], None);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let id = id.trim().to_string();
    let task_pid = json_number(&docker_api(&format!("/containers/{id}/json")), "Pid");
    assert!(task_pid > 1, "task pid {task_pid}");
    // The task pid is a host process in the container's network namespace.
    assert!(std::path::Path::new(&format!("/proc/{task_pid}/ns/net")).exists());

    // A long exec, detached: its pid as Docker records it.
    let bg = env.docker(&["exec", "-d", &n, "sleep", "200"], None, T);
    assert_eq!(bg.status.code(), Some(0), "{:?}", text(&bg));
    // What the guest would have said: the exec's pid inside the VM.
    let guest = env.docker(&["exec", &n, "sh", "-c", "echo $$"], None, T);
    assert_eq!(guest.status.code(), Some(0), "{:?}", text(&guest));
    let inspect = docker_api(&format!("/containers/{id}/json"));
    let exec_ids: Vec<String> = inspect
        .split("\"ExecIDs\":")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap_or("")
        .split('"')
        .filter(|s| s.len() == 64)
        .map(String::from)
        .collect();
    assert!(!exec_ids.is_empty(), "no running exec in {inspect}");
    for exec in &exec_ids {
        let ej = docker_api(&format!("/exec/{exec}/json"));
        let pid = json_number(&ej, "Pid");
        assert_eq!(pid, task_pid, "exec {exec} reports pid {pid}: {ej}");
    }

    // Another exec while the first runs still works, and `docker top` lists host processes.
    let echo = env.docker(&["exec", &n, "echo", "hi"], None, T);
    assert_eq!(text(&echo).0, "hi\n", "{:?}", text(&echo));
    let top = env.docker(&["top", &n], None, T);
    let (so, se) = text(&top);
    assert_eq!(top.status.code(), Some(0), "{se}");
    let pids: Vec<i64> = so
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(pids, vec![task_pid], "docker top:\n{so}");

    let rm = env.docker(&["rm", "-f", &n], None, T);
    assert_eq!(rm.status.code(), Some(0), "{:?}", text(&rm));
    env.assert_vm_gone(&id);
}
