//! Getting into a VM: `POST /vms/{id}/exec`, its WebSocket form (with a
//! pty), file copies through `/vms/{id}/files`, the CLI's `vm exec` and
//! `vm cp`, and an exec waking a suspended VM.

#![allow(clippy::unwrap_used)]

use hatch_e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Exits 0 if a `sleep` process runs in the guest, 1 if none (shell
/// builtins only: the default image has no pgrep).
const SLEEP_RUNS: &str = "for f in /proc/[0-9]*/comm; do read -r c < $f 2>/dev/null && [ \"$c\" = sleep ] && exit 0; done; exit 1";

async fn exec(d: &Daemon, id: &str, body: Value) -> (StatusCode, Value) {
    d.call(Method::POST, &format!("/vms/{id}/exec"), Some(body))
        .await
}

fn cli(d: &Daemon, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(hatch_bin())
        .args(args)
        .env("HATCH_API", format!("http://{}", d.api_addr))
        .env("HATCH_API_KEY", KEY)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        pipe.write_all(data).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn commands_run_in_a_vm_with_input_output_and_exit_codes() {
    let d = Daemon::start().await;
    let (id, boot) = d.boot_routed("shell").await;

    let (s, r) = exec(
        &d,
        &id,
        json!({"cmd": ["sh", "-c", "echo out; echo err >&2; cat; echo \"$X\"; pwd; exit 3"],
               "stdin": "piped in\n", "env": {"X": "from the request"}, "cwd": "/tmp"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        r["stdout"], "out\npiped in\nfrom the request\n/tmp\n",
        "{r}"
    );
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["timed_out"], false);

    // It runs in the VM the proxy reaches.
    let (_, r) = exec(
        &d,
        "shell",
        json!({"cmd": ["cat", "/proc/sys/kernel/random/boot_id"]}),
    )
    .await;
    assert_eq!(r["stdout"].as_str().unwrap().trim(), boot, "{r}");

    // A command that outlives its timeout is killed.
    let (s, r) = exec(
        &d,
        &id,
        json!({"cmd": ["sleep", "600"], "timeout_seconds": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["timed_out"].as_bool(), r["exit_code"].is_null()),
        (Some(true), true),
        "{r}"
    );
    // Killed with its process group (the session's drop sends the kill;
    // wait for it to land).
    loop {
        let (_, r) = exec(&d, &id, json!({"cmd": ["sh", "-c", SLEEP_RUNS]})).await;
        if r["exit_code"] == 1 {
            break;
        }
    }

    // Input larger than the pipes, to a command that writes as it reads,
    // and to one that never reads: neither stalls the agent.
    let big = vec![b'x'; 1 << 20];
    let (out, _, end) = exec_ws(&d, &id, json!({"cmd": ["cat"]}), &big).await;
    assert_eq!((out.len(), &end["exit_code"]), (big.len(), &json!(0)));
    let stuck = exec_ws(&d, &id, json!({"cmd": ["sleep", "600"]}), &big);
    let others_run = async {
        // Until the stuck one runs, other commands are answered all along.
        loop {
            let (s, r) = exec(&d, &id, json!({"cmd": ["sh", "-c", SLEEP_RUNS]})).await;
            assert_eq!(s, StatusCode::OK, "{r}");
            if r["exit_code"] == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = stuck => panic!("sleep 600 ended"),
        () = others_run => {}
    }
    // Its client is gone: the command is killed.
    loop {
        let (_, r) = exec(&d, &id, json!({"cmd": ["sh", "-c", SLEEP_RUNS]})).await;
        if r["exit_code"] == 1 {
            break;
        }
    }
    let stdin = "y".repeat(60_000);
    let (s, r) = exec(&d, &id, json!({"cmd": ["wc", "-c"], "stdin": stdin})).await;
    assert_eq!(
        (s, r["stdout"].as_str()),
        (StatusCode::OK, Some("60000\n")),
        "{r}"
    );

    // Bad requests change nothing and say why.
    for (body, code) in [
        (json!({"cmd": []}), "invalid_request"),
        (
            json!({"cmd": ["true"], "env": {"1BAD": "x"}}),
            "invalid_request",
        ),
        (
            json!({"cmd": ["true"], "timeout_seconds": 0}),
            "invalid_request",
        ),
        (
            json!({"cmd": ["true"], "cwd": "relative"}),
            "invalid_request",
        ),
        (json!({"cmd": ["/no/such/program"]}), "invalid_request"),
    ] {
        let (s, e) = exec(&d, &id, body.clone()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(code)),
            "{body}: {e}"
        );
    }
    let (s, _) = exec(&d, "vm-nosuchvm0000", json!({"cmd": ["true"]})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let unauthorized = reqwest::Client::new()
        .post(d.api_url(&format!("/vms/{id}/exec")))
        .json(&json!({"cmd": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);

    // Streaming: input goes in as it is sent, stdout and stderr come apart.
    let (out, err, end) = exec_ws(
        &d,
        &id,
        json!({"cmd": ["sh", "-c", "read l; echo \"got $l\"; echo e >&2; exit 4"]}),
        b"a line\n",
    )
    .await;
    assert_eq!((out.as_str(), err.as_str()), ("got a line\n", "e\n"));
    assert_eq!(end["exit_code"], 4, "{end}");
    // On a pty: a terminal, of the size asked for.
    let (out, _, end) = exec_ws(
        &d,
        &id,
        json!({"cmd": ["sh", "-c", "tty; stty size"], "tty": true, "rows": 30, "cols": 100}),
        b"",
    )
    .await;
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("30 100"), "{out:?}");
    assert_eq!(end["exit_code"], 0);

    // Files in and out, mode kept; a missing one is a 404.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let put = d
        .http
        .put(d.api_url(&format!("/vms/{id}/files?path=/tmp/blob&mode=600")))
        .bearer_auth(KEY)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let (_, r) = exec(
        &d,
        &id,
        json!({"cmd": ["stat", "-c", "%a %s", "/tmp/blob"]}),
    )
    .await;
    assert_eq!(r["stdout"], "600 200000\n", "{r}");
    let got = d
        .http
        .get(d.api_url(&format!("/vms/{id}/files?path=/tmp/blob")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert!(
        got.bytes().await.unwrap() == body,
        "the file came back changed"
    );
    let (s, e) = d
        .call(
            Method::GET,
            &format!("/vms/{id}/files?path=/no/such/file"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    // Only regular files: not a directory, not a FIFO (which would block).
    exec(&d, &id, json!({"cmd": ["mkfifo", "/tmp/fifo"]})).await;
    for path in ["/tmp", "/tmp/fifo", "/dev/zero"] {
        let (s, e) = d
            .call(Method::GET, &format!("/vms/{id}/files?path={path}"), None)
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {e}");
    }

    // The CLI: exit code, output, stdin with -i; cp both ways.
    let out = cli(
        &d,
        &["vm", "exec", "shell", "--", "sh", "-c", "echo hi; exit 5"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let out = cli(
        &d,
        &["vm", "exec", "-i", "shell", "--", "wc", "-c"],
        Some(b"12345"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    let local = d.data_dir.path().join("copied");
    std::fs::write(&local, b"to the vm\n").unwrap();
    let out = cli(
        &d,
        &["vm", "cp", local.to_str().unwrap(), "shell:/tmp/copied"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = d.data_dir.path().join("back");
    let out = cli(
        &d,
        &["vm", "cp", "shell:/tmp/copied", back.to_str().unwrap()],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), b"to the vm\n");
}

#[tokio::test]
async fn an_exec_wakes_a_suspended_vm() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (id, boot) = d.boot_routed("sleeper").await;
    d.get_ok("sleeper.localhost", "/counter").await;
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;

    let (s, r) = exec(
        &d,
        &id,
        json!({"cmd": ["cat", "/proc/sys/kernel/random/boot_id"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        boot,
        "woken, not booted"
    );
    assert_eq!(d.vm(&id).await["state"], "running");
    // The app's memory came back with it.
    let body = d.get_ok("sleeper.localhost", "/counter").await;
    assert_eq!(kv(&body, "counter"), "2");

    // A stopped VM is not started by an exec.
    let (s, _) = d.call(Method::POST, &format!("/vms/{id}/stop"), None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    d.wait_state(&id, "stopped").await;
    let (s, e) = exec(&d, &id, json!({"cmd": ["true"]})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict")),
        "{e}"
    );
    assert_eq!(d.vm(&id).await["state"], "stopped");
}
