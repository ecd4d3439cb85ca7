//! The daemon runs in-process on listeners the caller bound (port 0), the
//! way mini-redis tests its server: no port races, no binary.

use std::net::SocketAddr;

use hatch_server::daemon::Listeners;
use hatch_server::{Config, Secret};
use tokio_util::sync::CancellationToken;

const KEY: &str = "in-process-test-key";

#[tokio::test]
async fn serves_the_api_and_proxy_on_given_listeners_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("data"));
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.api_addr = any_port;
    cfg.proxy_addr = any_port;
    cfg.run_dir = dir.path().join("run");
    cfg.image_cache_dir = None;
    cfg.api_key = Some(Secret::new(KEY));
    cfg.network = hatch_server::network::Choice::User;
    let listeners = Listeners::bind(&cfg).await.unwrap();
    let api = listeners.api.local_addr().unwrap();
    let proxy = listeners.proxy.local_addr().unwrap();
    assert_ne!(api.port(), 0);

    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(hatch_server::run(cfg, listeners, shutdown.clone()));
    let http = reqwest::Client::new();

    let health = http
        .get(format!("http://{api}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let anonymous = http.get(format!("http://{api}/vms")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let vms: serde_json::Value = http
        .get(format!("http://{api}/vms"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(vms, serde_json::json!({ "vms": [] }));
    let unrouted = http
        .get(format!("http://{proxy}/"))
        .header("host", "nowhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(unrouted.status(), 404);

    shutdown.cancel();
    daemon.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(api).await.is_err(),
        "the API listener is closed after shutdown"
    );
}
