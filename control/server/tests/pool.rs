//! Warm pools: a create of the pool's source takes a sandbox made ahead (no backend create on
//! its path), the filler makes another, a create that names its own machine is not pooled, and
//! a graceful shutdown removes what the pools held.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;
use server::pool::PoolSpec;

use common::{app_configured, App, ALICE};

async fn metric(app: &App, line_start: &str) -> Option<String> {
    let (_, text) = app.call("GET", "/metrics", Some(ALICE), None).await;
    text.as_str()?
        .lines()
        .find(|l| l.starts_with(line_start))
        .map(String::from)
}

async fn until_pool_holds(app: &App, n: usize) {
    let want = format!("ember_pool_sandboxes{{pool=\"default\"}} {n}");
    for _ in 0..200 {
        if metric(app, "ember_pool_sandboxes").await.as_deref() == Some(want.as_str()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the pool never held {n}: {:?}", metric(app, "ember_pool_sandboxes").await);
}

#[tokio::test]
async fn a_create_takes_a_pooled_sandbox_and_the_pool_is_refilled() {
    let app = app_configured(|c| c.pools = vec![PoolSpec::parse("default=2").unwrap()]);
    let delay = Duration::from_millis(400);
    *app.backend.create_delay.lock().unwrap() = delay;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(listener, app.state.clone(), async {
        let _ = stopped.await;
    }));
    until_pool_holds(&app, 2).await;
    assert_eq!(
        metric(&app, "ember_pool_floor").await.as_deref(),
        Some("ember_pool_floor{pool=\"default\"} 2")
    );
    let asked = Instant::now();
    let made = app.create(ALICE, "fast").await;
    assert!(asked.elapsed() < delay, "took {:?}: not from the pool", asked.elapsed());
    let (_, events) = app
        .call("GET", "/api/v2/sandboxes/boxes/fast/events", Some(ALICE), None)
        .await;
    assert!(events.as_str().unwrap().contains(r#""pooled":true"#), "{events}");
    assert_eq!(made["status"], "ready");
    until_pool_holds(&app, 2).await;
    // Its own machine size: made for it, not taken from the pool.
    let (status, own) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "big", "mem_bytes": 512u64 << 20})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    let (_, events) = app
        .call("GET", "/api/v2/sandboxes/boxes/big/events", Some(ALICE), None)
        .await;
    assert!(events.as_str().unwrap().contains(r#""pooled":false"#), "{events}");
    let held: Vec<String> = app.state.pools.members().into_iter().map(|m| m.name).collect();
    assert_eq!(held.len(), 2);
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
    for name in held {
        assert!(
            server::backend::Backend::state(&*app.backend, &name).is_err(),
            "the pool's {name} is removed at shutdown"
        );
    }
    let fast = app.state.boxes.get("alice", "fast").unwrap().backend.unwrap();
    assert!(
        server::backend::Backend::state(&*app.backend, &fast).is_ok(),
        "a tenant's box stays"
    );
}

#[tokio::test]
async fn a_server_that_did_not_shut_down_finds_its_pool_again() {
    let app = common::app_with_registry_configured(|c| {
        c.pools = vec![PoolSpec::parse("default=1").unwrap()]
    });
    server::pool::fill(&app.state).await;
    let held: Vec<String> = app.state.pools.members().into_iter().map(|m| m.name).collect();
    assert_eq!(held.len(), 1);
    // As after a crash: the new server reads the registry, the old one never drained.
    let app = app.restarted();
    let again: Vec<String> = app.state.pools.members().into_iter().map(|m| m.name).collect();
    assert_eq!(again, held, "the same sandbox, not a second one");
    let made = app.create(ALICE, "from-pool").await;
    assert_eq!(
        app.state.boxes.find(made["id"].as_str().unwrap()).unwrap().backend.as_deref(),
        Some(held[0].as_str())
    );
}
