//! The test suite every [`StateStore`] backend must pass.
//!
//! Public (and hidden from the docs) so that the end-to-end tests can run it
//! against a real PostgreSQL; this crate's unit tests run it against SQLite.
//! It expects an empty store and panics on the first difference.

use hatch_vmm::PortForward;

use super::{
    ApiKeyRecord, Claim, EVENTS_KEPT, ImageDeletion, ImageRecord, NodeBeat, SnapshotRecord,
    StateStore,
};
use crate::model::{
    Retention, Route, Snapshot, SnapshotKind, SnapshotStatus, Vm, VmEvent, VmState,
};

/// Run every check, in order, on one empty store.
pub async fn run(store: &dyn StateStore) {
    vms(store).await;
    names_and_hostnames_are_unique(store).await;
    routes(store).await;
    events(store).await;
    snapshots(store).await;
    deleting_a_vm_takes_its_records_and_queues_its_objects(store).await;
    api_keys(store).await;
    pending_deletes(store).await;
    nodes(store).await;
    ownership_changes_are_compare_and_set(store).await;
    images(store).await;
}

fn vm(id: &str, name: &str) -> Vm {
    Vm {
        disk_mib: 1024,
        memory_mib: 1 << 33,
        vcpus: 3,
        ..Vm::fresh(
            id.into(),
            name.into(),
            VmState::Starting,
            "default".into(),
            format!("2026-01-01T00:00:0{}Z", id.len() % 10),
        )
    }
}

fn route(id: &str, hostname: &str, vm_id: &str) -> Route {
    Route {
        id: id.into(),
        hostname: hostname.into(),
        vm_id: vm_id.into(),
        port: 65535,
        auto_wake: true,
        idle_timeout_seconds: Some(30),
        idle_ignore_paths: vec!["/healthz".into()],
        created_at: format!("2026-01-01T00:00:00Z-{id}"),
        vm_state: None,
    }
}

fn snapshot(id: &str, vm_id: &str, created_at: &str, status: SnapshotStatus) -> SnapshotRecord {
    SnapshotRecord {
        snap: Snapshot {
            id: id.into(),
            vm_id: vm_id.into(),
            kind: SnapshotKind::Suspend,
            status,
            created_at: created_at.into(),
            trigger: "manual".into(),
            memory_bytes: 1 << 40,
            disk_bytes: 7,
            stored_bytes: 0,
            pause_ms: None,
            error: None,
        },
        local: false,
        layers: vec!["disk.qcow2".into()],
        local_used_at: None,
        upload_attempts: 0,
    }
}

async fn vms(store: &dyn StateStore) {
    let v = vm("vm-a1", "web");
    store.insert_vm(&v).await.expect("insert");
    assert!(store.vm_name_taken("web").await.expect("taken"));
    assert!(!store.vm_name_taken("other").await.expect("taken"));
    assert_eq!(
        store
            .vm_id_by_name("web")
            .await
            .expect("by name")
            .as_deref(),
        Some("vm-a1")
    );
    assert_eq!(store.vm_id_by_name("nope").await.expect("by name"), None);

    store.set_vm_started("vm-a1", "t1").await.expect("started");
    store.set_vm_boot_ms("vm-a1", 4321).await.expect("boot ms");
    let forwards = [PortForward {
        host: 40000,
        guest: 8080,
    }];
    store
        .set_vm_forwards("vm-a1", &forwards, "n0")
        .await
        .expect("forwards");
    store
        .set_vm_state("vm-a1", VmState::Failed, Some("qemu exited"), "n0")
        .await
        .expect("state");
    let rec = store.get_vm("vm-a1").await.expect("get").expect("present");
    assert_eq!(rec.vm.state, VmState::Failed);
    assert_eq!(rec.vm.state_reason.as_deref(), Some("qemu exited"));
    assert_eq!(rec.vm.started_at.as_deref(), Some("t1"));
    assert_eq!(rec.vm.boot_ms, Some(4321));
    assert_eq!(rec.vm.memory_mib, 1 << 33, "u64 columns keep large values");
    assert_eq!((rec.vm.vcpus, rec.vm.disk_mib), (3, 1024));
    assert_eq!(rec.forwards, forwards);
    assert_eq!(rec.vm.ports, forwards);
    // A restart clears the boot time of the previous one.
    store.set_vm_started("vm-a1", "t2").await.expect("started");
    let rec = store.get_vm("vm-a1").await.expect("get").expect("present");
    assert_eq!(
        (rec.vm.started_at.as_deref(), rec.vm.boot_ms),
        (Some("t2"), None)
    );

    assert_eq!(
        store.disk_layers("vm-a1").await.expect("layers"),
        ["disk.qcow2"],
        "a new VM has its base layer"
    );
    let layers = ["disk.qcow2".to_string(), "layer-1.qcow2".to_string()];
    store
        .set_disk_layers("vm-a1", &layers, "n0")
        .await
        .expect("set layers");
    assert_eq!(store.disk_layers("vm-a1").await.expect("layers"), layers);

    assert_eq!(
        store.retention("vm-a1").await.expect("retention"),
        Retention::default()
    );
    let policy = Retention {
        keep_last: Some(5),
        max_age_seconds: Some(1 << 40),
    };
    store
        .set_retention("vm-a1", &policy)
        .await
        .expect("set retention");
    assert_eq!(store.retention("vm-a1").await.expect("retention"), policy);

    assert!(store.get_vm("vm-none").await.expect("get").is_none());
    store
        .insert_vm(&vm("vm-a2", "web2"))
        .await
        .expect("insert second");
    let ids: Vec<String> = store
        .list_vms()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.vm.id)
        .filter(|id| id.starts_with("vm-a"))
        .collect();
    assert_eq!(ids, ["vm-a1", "vm-a2"], "oldest first");
}

async fn names_and_hostnames_are_unique(store: &dyn StateStore) {
    store.insert_vm(&vm("vm-u1", "same")).await.expect("insert");
    assert!(store.insert_vm(&vm("vm-u2", "same")).await.is_err());
    assert!(store.get_vm("vm-u2").await.expect("get").is_none());
    store
        .insert_route(&route("rt-u1", "u.localhost", "vm-u1"))
        .await
        .expect("route");
    assert!(
        store
            .insert_route(&route("rt-u2", "u.localhost", "vm-u1"))
            .await
            .is_err()
    );
}

async fn routes(store: &dyn StateStore) {
    store.insert_vm(&vm("vm-r1", "routed")).await.expect("vm");
    store
        .insert_route(&route("rt-r1", "r1.localhost", "vm-r1"))
        .await
        .expect("route");
    let mut plain = route("rt-r2", "r2.localhost", "vm-r1");
    plain.auto_wake = false;
    plain.idle_timeout_seconds = None;
    plain.idle_ignore_paths = vec![];
    store.insert_route(&plain).await.expect("route");
    let all: Vec<Route> = store
        .list_routes()
        .await
        .expect("list")
        .into_iter()
        .filter(|r| r.vm_id == "vm-r1")
        .collect();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].hostname, "r1.localhost", "oldest first");
    assert_eq!(all[0].port, 65535);
    assert!(all[0].auto_wake);
    assert_eq!(all[0].idle_timeout_seconds, Some(30));
    assert_eq!(all[0].idle_ignore_paths, ["/healthz"]);
    assert!(!all[1].auto_wake);
    assert_eq!(all[1].idle_timeout_seconds, None);
    assert!(store.delete_route("rt-r2").await.expect("delete"));
    assert!(!store.delete_route("rt-r2").await.expect("delete again"));
}

async fn events(store: &dyn StateStore) {
    store.insert_vm(&vm("vm-e1", "evented")).await.expect("vm");
    for i in 0..(EVENTS_KEPT + 5) {
        store
            .add_event(&VmEvent {
                vm_id: "vm-e1".into(),
                at: format!("t{i}"),
                kind: "wake".into(),
                trigger: "request".into(),
                duration_ms: Some(i as u64),
                snapshot_id: (i % 2 == 0).then(|| format!("snap-{i}")),
                error: None,
                warnings: vec![format!("w{i}")],
            })
            .await
            .expect("event");
    }
    let events = store.list_events("vm-e1").await.expect("list");
    assert_eq!(events.len() as i64, EVENTS_KEPT, "only the newest are kept");
    let newest = EVENTS_KEPT + 4;
    assert_eq!(events[0].at, format!("t{newest}"), "newest first");
    assert_eq!(events[0].warnings, [format!("w{newest}")]);
    assert_eq!(events[0].duration_ms, Some(newest as u64));
    assert_eq!(events[0].snapshot_id, Some(format!("snap-{newest}")));
    assert_eq!(events[1].snapshot_id, None);
    assert!(store.list_events("vm-none").await.expect("list").is_empty());
}

async fn snapshots(store: &dyn StateStore) {
    store.insert_vm(&vm("vm-s1", "snapped")).await.expect("vm");
    // Two with the same creation second: the later insert is the newer.
    for id in ["snap-s1", "snap-s2"] {
        store
            .save_snapshot(&snapshot(
                id,
                "vm-s1",
                "2026-01-01T00:00:01Z",
                SnapshotStatus::Uploading,
            ))
            .await
            .expect("save");
    }
    store
        .save_snapshot(&snapshot(
            "snap-s0",
            "vm-s1",
            "2026-01-01T00:00:00Z",
            SnapshotStatus::Ready,
        ))
        .await
        .expect("save");
    let ids = |v: Vec<SnapshotRecord>| v.into_iter().map(|r| r.snap.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_snapshots("vm-s1").await.expect("list")),
        ["snap-s2", "snap-s1", "snap-s0"],
        "newest first"
    );
    assert_eq!(
        ids(store
            .snapshots_with_status(SnapshotStatus::Uploading)
            .await
            .expect("with status")),
        ["snap-s1", "snap-s2"],
        "oldest first"
    );

    // Saving again writes back every mutable field.
    let mut rec = store
        .get_snapshot("snap-s1")
        .await
        .expect("get")
        .expect("present");
    rec.snap.status = SnapshotStatus::Failed;
    rec.snap.stored_bytes = 1 << 41;
    rec.snap.pause_ms = Some(12);
    rec.snap.error = Some("upload failed".into());
    rec.local = true;
    rec.layers = vec!["disk.qcow2".into(), "layer-2.qcow2".into()];
    rec.local_used_at = Some("2026-01-02T00:00:00Z".into());
    rec.upload_attempts = 3;
    store.save_snapshot(&rec).await.expect("update");
    let back = store
        .get_snapshot("snap-s1")
        .await
        .expect("get")
        .expect("present");
    assert_eq!(back.snap.status, SnapshotStatus::Failed);
    assert_eq!(back.snap.stored_bytes, 1 << 41);
    assert_eq!(back.snap.memory_bytes, 1 << 40);
    assert_eq!(back.snap.pause_ms, Some(12));
    assert_eq!(back.snap.error.as_deref(), Some("upload failed"));
    assert_eq!(back.snap.kind, SnapshotKind::Suspend);
    assert!(back.local);
    assert_eq!(back.layers, rec.layers);
    assert_eq!(back.upload_attempts, 3);

    // Local copies, least recently used first (never used: by creation).
    let mut older = store
        .get_snapshot("snap-s0")
        .await
        .expect("get")
        .expect("present");
    older.local = true;
    store.save_snapshot(&older).await.expect("update");
    assert_eq!(
        ids(store.local_snapshots().await.expect("local")),
        ["snap-s0", "snap-s1"]
    );

    store
        .delete_snapshot("snap-s2", "manifests/vm-s1/snap-s2.json", "t")
        .await
        .expect("delete");
    assert!(store.get_snapshot("snap-s2").await.expect("get").is_none());
    assert!(
        store
            .pending_deletes()
            .await
            .expect("pending")
            .contains(&("manifests/vm-s1/snap-s2.json".to_string(), 0))
    );
    store
        .remove_pending_delete("manifests/vm-s1/snap-s2.json")
        .await
        .expect("remove");
}

async fn deleting_a_vm_takes_its_records_and_queues_its_objects(store: &dyn StateStore) {
    store.insert_vm(&vm("vm-d1", "doomed")).await.expect("vm");
    store
        .insert_route(&route("rt-d1", "d.localhost", "vm-d1"))
        .await
        .expect("route");
    store
        .save_snapshot(&snapshot("snap-d1", "vm-d1", "t", SnapshotStatus::Ready))
        .await
        .expect("snapshot");
    store
        .add_event(&VmEvent {
            vm_id: "vm-d1".into(),
            at: "t".into(),
            kind: "wake".into(),
            trigger: "request".into(),
            duration_ms: None,
            snapshot_id: None,
            error: Some("boom".into()),
            warnings: vec![],
        })
        .await
        .expect("event");
    let hostnames = store
        .delete_vm("vm-d1", &["manifests/vm-d1/snap-d1.json".into()], "t")
        .await
        .expect("delete");
    assert_eq!(hostnames, ["d.localhost"]);
    assert!(store.get_vm("vm-d1").await.expect("get").is_none());
    assert!(store.get_snapshot("snap-d1").await.expect("get").is_none());
    assert!(store.list_events("vm-d1").await.expect("events").is_empty());
    assert!(
        !store
            .list_routes()
            .await
            .expect("routes")
            .iter()
            .any(|r| r.vm_id == "vm-d1")
    );
    assert!(
        store
            .pending_deletes()
            .await
            .expect("pending")
            .contains(&("manifests/vm-d1/snap-d1.json".to_string(), 0))
    );
    store
        .remove_pending_delete("manifests/vm-d1/snap-d1.json")
        .await
        .expect("remove");
}

async fn api_keys(store: &dyn StateStore) {
    let key = |id: &str, hash: &[u8], source: &str| ApiKeyRecord {
        id: id.into(),
        hash: hash.to_vec(),
        name: Some(format!("name of {id}")),
        source: source.into(),
        created_at: format!("2026-01-01T00:00:00Z-{id}"),
    };
    store
        .insert_api_key(&key("key-1", &[1, 0, 255], "generated"))
        .await
        .expect("insert");
    // The same hash again is ignored (a daemon restarted with the same key).
    store
        .insert_api_key(&key("key-1b", &[1, 0, 255], "env"))
        .await
        .expect("insert same hash");
    store
        .insert_api_key(&key("key-2", &[2], "env"))
        .await
        .expect("insert");
    store
        .insert_api_key(&key("key-3", &[3], "env"))
        .await
        .expect("insert");
    let keys = store.api_keys().await.expect("keys");
    let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, ["key-1", "key-2", "key-3"], "oldest first");
    assert_eq!(keys[0].hash, [1, 0, 255]);
    assert_eq!(keys[0].name.as_deref(), Some("name of key-1"));
    assert_eq!(keys[0].source, "generated");

    assert_eq!(
        store
            .revoke_env_keys_except(Some(&[3]))
            .await
            .expect("revoke"),
        1
    );
    assert_eq!(store.revoke_env_keys_except(None).await.expect("revoke"), 1);
    assert!(
        store
            .delete_api_key_unless_last("key-1")
            .await
            .is_ok_and(|deleted| !deleted)
    );
    assert_eq!(
        store.api_keys().await.expect("keys").len(),
        1,
        "the last stays"
    );
}

async fn pending_deletes(store: &dyn StateStore) {
    store
        .add_pending_delete("manifests/x.json", "timeout", "2026-01-01T00:00:00Z")
        .await
        .expect("add");
    store
        .add_pending_delete("manifests/x.json", "timeout again", "2026-01-01T00:00:09Z")
        .await
        .expect("add again");
    store
        .add_pending_delete("manifests/y.json", "timeout", "2026-01-01T00:00:05Z")
        .await
        .expect("add");
    assert_eq!(
        store.pending_deletes().await.expect("pending"),
        [
            ("manifests/x.json".to_string(), 2),
            ("manifests/y.json".to_string(), 1)
        ]
    );
    store
        .remove_pending_delete("manifests/x.json")
        .await
        .expect("remove");
    store
        .remove_pending_delete("manifests/y.json")
        .await
        .expect("remove");
    assert!(store.pending_deletes().await.expect("pending").is_empty());
}

async fn nodes(store: &dyn StateStore) {
    let beat = |name: &str, free: u64| NodeBeat {
        name: name.into(),
        addr: Some(format!("127.0.0.1:7{}", name.len())),
        free_memory_mib: free,
        started_at: "2026-01-01T00:00:00Z".into(),
    };
    store.heartbeat(&beat("n2", 100)).await.expect("beat");
    store.heartbeat(&beat("n1", 100)).await.expect("beat");
    store
        .heartbeat(&beat("n1", 2048))
        .await
        .expect("beat again");
    let mut on_n1 = vm("vm-n1", "on-n1");
    on_n1.node = Some("n1".into());
    store.insert_vm(&on_n1).await.expect("vm");
    assert_eq!(
        store
            .get_vm("vm-n1")
            .await
            .expect("get")
            .expect("present")
            .vm
            .node
            .as_deref(),
        Some("n1")
    );
    store
        .insert_vm(&Vm {
            node: Some("n1".into()),
            ..vm("vm-n2", "stopped-on-n1")
        })
        .await
        .expect("vm");
    assert!(
        store
            .set_vm_state("vm-n2", VmState::Stopped, None, "n1")
            .await
            .expect("state")
    );

    let nodes = store.list_nodes().await.expect("nodes");
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["n1", "n2"], "by name, each once");
    assert_eq!(nodes[0].free_memory_mib, 2048, "the newest heartbeat");
    assert_eq!(nodes[0].addr.as_deref(), Some("127.0.0.1:72"));
    assert_eq!(nodes[0].state, "up");
    assert_eq!(nodes[0].vms, 1, "only VMs with a process count");
    assert_eq!(nodes[1].vms, 0);
    assert!(nodes[0].silent_for < std::time::Duration::from_secs(60));
    assert!(
        nodes[0].heartbeat_at.starts_with("20"),
        "{}",
        nodes[0].heartbeat_at
    );

    assert!(store.set_node_state("n2", "draining").await.expect("drain"));
    assert!(!store.set_node_state("n9", "draining").await.expect("drain"));
    store.heartbeat(&beat("n2", 1)).await.expect("beat");
    let nodes = store.list_nodes().await.expect("nodes");
    assert_eq!(nodes[1].state, "draining", "a heartbeat keeps the mark");
    assert!(store.set_node_state("n2", "up").await.expect("undrain"));

    store.set_vm_node("vm-n1", "n2").await.expect("move");
    let nodes = store.list_nodes().await.expect("nodes");
    assert_eq!((nodes[0].vms, nodes[1].vms), (0, 1));
}

async fn ownership_changes_are_compare_and_set(store: &dyn StateStore) {
    use std::time::Duration;
    let beat = |name: &str| NodeBeat {
        name: name.into(),
        addr: None,
        free_memory_mib: 1,
        started_at: "t".into(),
    };
    store.heartbeat(&beat("o1")).await.expect("beat");
    let mut v = vm("vm-o1", "owned");
    v.node = Some("o1".into());
    store.insert_vm(&v).await.expect("vm");
    let epoch = store
        .get_vm("vm-o1")
        .await
        .expect("get")
        .expect("present")
        .epoch;
    // o2 is not the owner: its state write changes nothing.
    assert!(
        !store
            .set_vm_state("vm-o1", VmState::Failed, Some("stale"), "o2")
            .await
            .expect("state")
    );
    assert_eq!(
        store
            .get_vm("vm-o1")
            .await
            .expect("get")
            .expect("present")
            .vm
            .state,
        VmState::Starting
    );
    let takeover = |seen, from_silent_for| Claim {
        id: "vm-o1",
        seen,
        from: Some("o1"),
        to: "o2",
        from_silent_for,
    };
    // The owner heartbeat just now: a takeover that requires it to be
    // silent for a minute is refused, whatever the epoch.
    assert!(
        !store
            .take_over_vm(
                &takeover(epoch, Some(Duration::from_secs(60))),
                VmState::Failed,
                "no"
            )
            .await
            .expect("take over")
    );
    // Silent for "0 s" (it is, by a hair): the takeover wins once, and the
    // VM is the taker's; a second with the same epoch fails.
    assert!(
        store
            .take_over_vm(
                &takeover(epoch, Some(Duration::ZERO)),
                VmState::Snapshotted,
                "node o1 was lost"
            )
            .await
            .expect("take over")
    );
    assert!(
        !store
            .take_over_vm(&takeover(epoch, None), VmState::Failed, "again")
            .await
            .expect("take over")
    );
    let rec = store.get_vm("vm-o1").await.expect("get").expect("present");
    assert_eq!((rec.vm.state, rec.epoch), (VmState::Snapshotted, epoch + 1));
    assert_eq!(rec.vm.node.as_deref(), Some("o2"));
    assert_eq!(rec.vm.state_reason.as_deref(), Some("node o1 was lost"));
    // Two nodes claim with what they read: exactly one wins.
    let claim = |to| Claim {
        id: "vm-o1",
        seen: epoch + 1,
        from: Some("o2"),
        to,
        from_silent_for: None,
    };
    let a = store.claim_vm(&claim("o3")).await.expect("claim");
    let b = store.claim_vm(&claim("o4")).await.expect("claim");
    assert!(a && !b);
    // A claim from an owner that is not the one recorded fails.
    let wrong_owner = Claim {
        id: "vm-o1",
        seen: epoch + 2,
        from: Some("o2"),
        to: "o4",
        from_silent_for: None,
    };
    assert!(!store.claim_vm(&wrong_owner).await.expect("claim"));
    let rec = store.get_vm("vm-o1").await.expect("get").expect("present");
    assert_eq!((rec.vm.node.as_deref(), rec.epoch), (Some("o3"), epoch + 2));
    // The old owners' writes are refused from now on; the new owner's go in.
    assert!(matches!(
        store.set_disk_layers("vm-o1", &["x".into()], "o1").await,
        Err(super::StoreError::NotOwner(_))
    ));
    assert!(matches!(
        store.set_vm_forwards("vm-o1", &[], "o2").await,
        Err(super::StoreError::NotOwner(_))
    ));
    store
        .set_disk_layers("vm-o1", &["y".into()], "o3")
        .await
        .expect("owner writes");
    assert_eq!(store.disk_layers("vm-o1").await.expect("layers"), ["y"]);
    assert!(
        !store
            .set_vm_state("vm-o1", VmState::Running, None, "o1")
            .await
            .expect("state")
    );
    assert!(
        store
            .set_vm_state("vm-o1", VmState::Restoring, None, "o3")
            .await
            .expect("state")
    );
    // A VM that is gone is not "taken over".
    assert!(
        store
            .set_vm_state("vm-none", VmState::Running, None, "o1")
            .await
            .expect("state")
    );
    // An unowned VM is claimed without conditions on an owner.
    store.insert_vm(&vm("vm-o2", "unowned")).await.expect("vm");
    let free = Claim {
        id: "vm-o2",
        seen: 0,
        from: None,
        to: "o3",
        from_silent_for: Some(Duration::from_secs(60)),
    };
    assert!(store.claim_vm(&free).await.expect("claim"));
}

async fn images(store: &dyn StateStore) {
    let image = |name: &str, id: &str, manifest: Option<&str>| ImageRecord {
        name: name.into(),
        id: id.into(),
        created_at: "2026-12-02T10:00:00Z".into(),
        node: "n1".into(),
        manifest: manifest.map(String::from),
        details: r#"{"disk_mib":300}"#.into(),
    };
    let web = image("web", "img-1", Some("images/web/img-1.json"));
    let local = image("local", "img-2", None);
    assert!(store.insert_image(&web).await.expect("images"));
    assert!(store.insert_image(&local).await.expect("images"));
    // A taken name is refused and the first record stays.
    assert!(
        !store
            .insert_image(&image("web", "img-3", None))
            .await
            .expect("images")
    );
    assert_eq!(
        store.get_image("web").await.expect("images"),
        Some(web.clone())
    );
    assert_eq!(store.get_image("nope").await.expect("images"), None);
    assert_eq!(
        store.list_images().await.expect("images"),
        [local.clone(), web.clone()]
    );

    // Not while a VM of any node uses it.
    let mut user = vm("vm-imageuser01", "image-user");
    user.image = "web".into();
    store.insert_vm(&user).await.expect("images");
    assert_eq!(
        store
            .delete_image("web", "2026-12-02T11:00:00Z")
            .await
            .expect("images"),
        ImageDeletion::InUse(vec!["vm-imageuser01".into()])
    );
    assert_eq!(store.get_image("web").await.expect("images"), Some(web));
    store
        .delete_vm("vm-imageuser01", &[], "2026-12-02T11:00:00Z")
        .await
        .expect("images");
    let queued_before = store.pending_deletes().await.expect("images").len();
    assert_eq!(
        store
            .delete_image("web", "2026-12-02T11:00:00Z")
            .await
            .expect("images"),
        ImageDeletion::Deleted
    );
    assert_eq!(
        store
            .delete_image("web", "2026-12-02T11:00:00Z")
            .await
            .expect("images"),
        ImageDeletion::NotFound
    );
    // Its manifest is queued for deletion from S3; an image without one
    // queues nothing.
    let queued = store.pending_deletes().await.expect("images");
    assert!(queued.iter().any(|(k, _)| k == "images/web/img-1.json"));
    assert_eq!(queued.len(), queued_before + 1);
    assert_eq!(
        store
            .delete_image("local", "2026-12-02T11:00:00Z")
            .await
            .expect("images"),
        ImageDeletion::Deleted
    );
    assert_eq!(
        store.pending_deletes().await.expect("images").len(),
        queued_before + 1
    );
    assert!(store.list_images().await.expect("images").is_empty());
    store
        .remove_pending_delete("images/web/img-1.json")
        .await
        .expect("images");
}
