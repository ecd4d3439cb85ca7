//! The QMP client against a scripted fake QEMU on a unix socket.

#![allow(clippy::unwrap_used)]

use hatch_qmp::commands::{HumanMonitorCommand, QueryStatus, Stop};
use hatch_qmp::{Qmp, QmpError};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;

/// Accepts one client, greets it, and answers each command with `answer`.
async fn fake_qemu<F>(listener: UnixListener, answer: F)
where
    F: Fn(&Value, &mut Vec<Value>) -> Option<Value> + Send + 'static,
{
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    send(
        &mut write,
        &json!({"QMP": {"version": {}, "capabilities": []}}),
    )
    .await;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        let cmd: Value = serde_json::from_str(&line).unwrap();
        let mut extra = Vec::new();
        let reply = if cmd["execute"] == "qmp_capabilities" {
            Some(json!({"return": {}, "id": cmd["id"]}))
        } else {
            answer(&cmd, &mut extra)
        };
        for msg in extra {
            send(&mut write, &msg).await;
        }
        match reply {
            Some(reply) => send(&mut write, &reply).await,
            None => return, // hang up, like QEMU exiting
        }
    }
}

async fn send(w: &mut OwnedWriteHalf, v: &Value) {
    let mut s = v.to_string();
    s.push('\n');
    w.write_all(s.as_bytes()).await.unwrap();
}

fn socket() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

#[tokio::test]
async fn typed_command_round_trip_and_arguments() {
    let (_dir, path, listener) = socket();
    tokio::spawn(fake_qemu(listener, |cmd, _| {
        Some(match cmd["execute"].as_str().unwrap() {
            "query-status" => {
                assert!(
                    cmd.get("arguments").is_none(),
                    "unit command sent arguments"
                );
                json!({"return": {"running": true, "status": "running"}, "id": cmd["id"]})
            }
            "human-monitor-command" => {
                let line = cmd["arguments"]["command-line"].as_str().unwrap();
                json!({"return": format!("echo:{line}"), "id": cmd["id"]})
            }
            other => panic!("unexpected {other}"),
        })
    }));
    let qmp = Qmp::connect(&path).await.unwrap();
    let status = qmp.execute(&QueryStatus).await.unwrap();
    assert!(status.running);
    assert_eq!(status.status, "running");
    let out = qmp
        .execute(&HumanMonitorCommand {
            command_line: "info network".into(),
        })
        .await
        .unwrap();
    assert_eq!(out, "echo:info network");
}

#[tokio::test]
async fn errors_are_reported_with_class_and_description() {
    let (_dir, path, listener) = socket();
    tokio::spawn(fake_qemu(listener, |cmd, _| {
        Some(json!({"error": {"class": "GenericError", "desc": "nope"}, "id": cmd["id"]}))
    }));
    let qmp = Qmp::connect(&path).await.unwrap();
    match qmp.execute(&Stop).await {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "stop");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "nope");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[tokio::test]
async fn events_are_delivered_and_do_not_disturb_answers() {
    let (_dir, path, listener) = socket();
    tokio::spawn(fake_qemu(listener, |cmd, extra| {
        extra.push(
            json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}),
        );
        Some(json!({"return": {}, "id": cmd["id"]}))
    }));
    let qmp = Qmp::connect(&path).await.unwrap();
    let mut events = qmp.events();
    qmp.execute(&Stop).await.unwrap();
    let event = events.recv().await.unwrap();
    assert_eq!(event.event, "STOP");
}

#[tokio::test]
async fn hang_up_fails_pending_calls_and_resolves_closed() {
    let (_dir, path, listener) = socket();
    tokio::spawn(fake_qemu(listener, |_, _| None));
    let qmp = Qmp::connect(&path).await.unwrap();
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(err, QmpError::Disconnected), "{err:?}");
    qmp.closed().await;
    assert!(qmp.is_closed());
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(err, QmpError::Disconnected), "{err:?}");
}

#[tokio::test]
async fn rejects_a_peer_that_is_not_qmp() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"{\"hello\": 1}\n").await.unwrap();
    });
    let err = Qmp::connect(&path).await.err().unwrap();
    assert!(matches!(err, QmpError::Handshake(_)), "{err:?}");
}

/// A QEMU that negotiates, then never answers again (hung, or SIGSTOPped):
/// every command fails with a timeout instead of waiting forever.
#[tokio::test]
async fn a_command_without_an_answer_times_out() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        send(
            &mut write,
            &json!({"QMP": {"version": {}, "capabilities": []}}),
        )
        .await;
        let mut lines = BufReader::new(read).lines();
        let cap: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        send(&mut write, &json!({"return": {}, "id": cap["id"]})).await;
        // Read on, answer nothing, keep the connection open.
        while let Ok(Some(_)) = lines.next_line().await {}
        drop(write);
    });
    let qmp = Qmp::connect(&path).await.unwrap();
    qmp.set_timeout(std::time::Duration::from_millis(200));
    let err = qmp.execute(&Stop).await.unwrap_err();
    assert!(
        matches!(
            err,
            QmpError::Timeout {
                command: "stop",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("did not answer stop"), "{err}");
}
