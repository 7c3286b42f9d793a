//! Docker Compose with `runtime: agentvm`: a web server and a client that fetches from it by
//! service name, both in VMs, come up and go down without leaving anything behind.
//! Needs hack/docker-up.sh (hack/test.sh runs it) and docker-compose.

use std::time::Duration;

use agentvm_integration::{text, unique_name, DockerEnv};

const T: Duration = Duration::from_secs(300);

#[test]
fn compose_project_with_two_agentvm_services() {
    let Some(env) = DockerEnv::get("compose_project_with_two_agentvm_services") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    let compose = format!(
        r#"services:
  web:
    image: {image}
    runtime: agentvm
    command: ["sh", "-c", "mkdir -p /www && echo hello-compose > /www/index.html && exec httpd -f -p 8080 -h /www"]
  client:
    image: {image}
    runtime: agentvm
    depends_on: [web]
    command: ["sh", "-c", "for i in $$(seq 150); do wget -qO- http://web:8080/ && exit 0; sleep 0.2; done; exit 1"]
"#,
        image = env.image
    );
    std::fs::write(&file, compose).unwrap();
    let project = unique_name("compose");
    let f = file.to_str().unwrap();
    let compose_cmd = |args: &[&str]| {
        let mut all = vec!["compose", "-p", &project, "-f", f];
        all.extend_from_slice(args);
        env.docker(&all, None, T)
    };
    let out = compose_cmd(&[
        "up",
        "--abort-on-container-exit",
        "--exit-code-from",
        "client",
    ]);
    let (so, se) = text(&out);
    let ids = compose_cmd(&["ps", "-aq"]);
    let ids: Vec<String> = text(&ids).0.lines().map(|l| l.trim().to_string()).collect();
    let full_ids: Vec<String> = ids
        .iter()
        .filter(|i| !i.is_empty())
        .map(|i| {
            let o = env.docker(&["inspect", "-f", "{{.Id}}", i], None, T);
            text(&o).0.trim().to_string()
        })
        .collect();
    let down = compose_cmd(&["down", "--timeout", "5"]);
    assert_eq!(out.status.code(), Some(0), "compose up: {so}\n{se}");
    assert!(so.contains("hello-compose"), "{so}");
    assert!(down.status.success(), "compose down: {:?}", text(&down));
    assert_eq!(full_ids.len(), 2, "{ids:?}");
    for id in &full_ids {
        env.assert_vm_gone(id);
    }
}
