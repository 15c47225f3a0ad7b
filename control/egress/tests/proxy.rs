//! The proxy end to end on loopback: a client of the test's own through the proxy to an echo
//! upstream (see `common`).

mod common;

use std::time::Duration;

use common::{client, connect_over, get, peer_certificate, tls, World, SECRET};
use http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_host_without_rules_is_tunnelled_with_its_own_certificate() {
    let world = World::start().await;
    world.set_policy(json!({"access_control": {"allow_list": ["localhost"]}}));
    let tunnel = world
        .connect(&format!("localhost:{}", world.https_port))
        .await
        .unwrap();
    // The client trusts the test CA only: the upstream's own certificate came through.
    let tls = tls(tunnel, &world.test_ca).await.unwrap();
    assert_eq!(peer_certificate(&tls), world.upstream_cert);
    let mut sender = client(tls).await;
    let (status, seen) = get(
        &mut sender,
        "localhost",
        "/hello",
        &[("authorization", "Bearer mine")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        seen["headers"]["authorization"], "Bearer mine",
        "a tunnel is not touched"
    );
    drop(sender);

    let line = world.audit_line(|l| l["mode"] == "tunnelled").await;
    assert_eq!(line["method"], "CONNECT");
    assert_eq!(line["host"], "localhost");
    assert_eq!(line["port"], world.https_port);
    assert_eq!(line["status"], 200);
    assert_eq!(line["decided_by"], "allow_list entry localhost");
    assert!(line["bytes_up"].as_u64().unwrap() > 0);
    assert!(line["bytes_down"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_host_gets_the_403_text_for_connect_and_plain_http() {
    let world = World::start().await;
    world.set_policy(json!({"access_control": {"allow_list": ["localhost"]}}));
    let (status, body) = world
        .connect(&format!("127.0.0.1:{}", world.https_port))
        .await
        .err()
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        format!(
            "ember: egress to 127.0.0.1:{} denied by this sandbox's policy\n",
            world.https_port
        )
    );
    let (status, body) = world
        .get_via_proxy(&format!("http://127.0.0.1:{}/x", world.http_port))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        format!(
            "ember: egress to 127.0.0.1:{} denied by this sandbox's policy\n",
            world.http_port
        )
    );

    let line = world.audit_line(|l| l["method"] == "CONNECT").await;
    assert_eq!(
        (line["mode"].as_str(), line["status"].as_u64()),
        (Some("denied"), Some(403))
    );
    assert_eq!(line["decided_by"], "not in the allow_list");
    let line = world.audit_line(|l| l["method"] == "GET").await;
    assert_eq!(
        (line["mode"].as_str(), line["path"].as_str()),
        (Some("denied"), Some("/x"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_without_a_proxy_config_reaches_nothing() {
    let world = World::start().await;
    let (status, _) = world
        .connect(&format!("localhost:{}", world.https_port))
        .await
        .err()
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let line = world.audit_line(|l| l["mode"] == "denied").await;
    assert_eq!(line["decided_by"], "no proxy_config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intercepted_connect_presents_an_ember_leaf_and_injects_the_rules_headers() {
    let world = World::start().await;
    world.set_policy(json!({"rules": [{
        "name": "echo",
        "match_hosts": ["localhost"],
        "headers": [
            {"name": "X-Api-Key", "type": "workspace_secret", "value": "{ECHO_KEY}"},
            {"name": "Authorization", "type": "opaque", "value": "Bearer host-side"}
        ]
    }]}));
    let authority = format!("localhost:{}", world.https_port);

    // A client that trusts only the test CA refuses the proxy's leaf: it is intercepted.
    let tunnel = world.connect(&authority).await.unwrap();
    assert!(tls(tunnel, &world.test_ca).await.is_err());

    let tunnel = world.connect(&authority).await.unwrap();
    let ember_ca = world.ca.cert_der().clone();
    let tls = tls(tunnel, &ember_ca).await.unwrap();
    assert_ne!(peer_certificate(&tls), world.upstream_cert);
    let mut sender = client(tls).await;
    let (status, seen) = get(
        &mut sender,
        "localhost",
        "/v1/runs?page=2",
        &[
            ("authorization", "Bearer from-the-sandbox"),
            ("cookie", "session=1"),
            ("x-api-key", "guest-value"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen["headers"]["x-api-key"], SECRET);
    assert_eq!(seen["headers"]["authorization"], "Bearer host-side");
    assert!(seen["headers"].get("cookie").is_none());
    assert_eq!(seen["path"], "/v1/runs?page=2");
    assert_eq!(seen["body"], 2);

    // The same connection carries the next request.
    let (status, seen) = get(&mut sender, "localhost", "/again", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen["headers"]["x-api-key"], SECRET);

    let line = world.audit_line(|l| l["path"] == "/v1/runs?page=2").await;
    assert_eq!(line["mode"], "intercepted");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 200);
    assert_eq!(line["rule"], "echo");
    assert_eq!(line["decided_by"], "no access_control");
    assert_eq!(line["bytes_up"], 2);
    assert!(line["bytes_down"].as_u64().unwrap() > 0);
    assert!(
        !std::fs::read_to_string(&world.audit)
            .unwrap()
            .contains(SECRET),
        "the audit log holds no secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandboxs_own_authorization_to_a_rules_host_is_stripped() {
    let world = World::start().await;
    world.set_policy(json!({"rules": [{
        "name": "only-v1",
        "match_hosts": ["localhost"],
        "match_paths": ["/v1/*"],
        "headers": [{"name": "X-Api-Key", "type": "workspace_secret", "value": "{ECHO_KEY}"}]
    }]}));
    let tunnel = world
        .connect(&format!("localhost:{}", world.https_port))
        .await
        .unwrap();
    let tls = tls(tunnel, world.ca.cert_der()).await.unwrap();
    let mut sender = client(tls).await;
    let (status, seen) = get(
        &mut sender,
        "localhost",
        "/v2/other",
        &[
            ("authorization", "Bearer from-the-sandbox"),
            ("x-api-key", "guest-value"),
            ("accept", "text/x"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert!(
        seen["headers"].get("x-api-key").is_none(),
        "no rule matched /v2: nothing added"
    );
    assert_eq!(seen["headers"]["accept"], "text/x");
    let line = world.audit_line(|l| l["path"] == "/v2/other").await;
    assert!(line.get("rule").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_forwarded_in_origin_form() {
    let world = World::start().await;
    world.set_policy(json!({"access_control": {"deny_list": ["*.example.com"]}}));
    let (status, body) = world
        .get_via_proxy(&format!("http://localhost:{}/p?q=1", world.http_port))
        .await;
    assert_eq!(status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/p?q=1");
    assert_eq!(
        seen["headers"]["host"],
        format!("localhost:{}", world.http_port)
    );
    let line = world.audit_line(|l| l["mode"] == "forwarded").await;
    assert_eq!(
        (line["status"].as_u64(), line["path"].as_str()),
        (Some(200), Some("/p?q=1"))
    );
    assert_eq!(line["decided_by"], "not in the deny_list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_swap_applies_to_the_next_connection() {
    let world = World::start().await;
    world.set_policy(json!({"access_control": {"allow_list": ["localhost"]}}));
    let authority = format!("localhost:{}", world.https_port);
    let tunnel = world.connect(&authority).await.unwrap();

    world.set_policy(json!({"access_control": {"deny_list": ["localhost"]}}));
    let (status, _) = world.connect(&authority).await.err().unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let line = world.audit_line(|l| l["mode"] == "denied").await;
    assert_eq!(line["decided_by"], "deny_list entry localhost");

    // The tunnel made before the swap goes on under the policy it started with.
    let tls = tls(tunnel, &world.test_ca).await.unwrap();
    let (status, _) = get(&mut client(tls).await, "localhost", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_cannot_be_reached_is_a_502_that_says_why() {
    let world = World::start().await;
    world.set_policy(json!({"access_control": {"allow_list": ["localhost"]}}));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (status, body) = world
        .connect(&format!("localhost:{closed}"))
        .await
        .err()
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.starts_with(&format!(
            "ember: cannot reach localhost:{closed}: cannot connect"
        )),
        "{body}"
    );
    let line = world.audit_line(|l| l["status"] == 502).await;
    assert_eq!(line["mode"], "tunnelled");

    // An intercepted host whose TLS fails (it speaks plain HTTP): 502 too, answered to the
    // CONNECT itself, before any byte of the sandbox's TLS.
    world.proxy.set_policy(
        egress::policy::Policy::compile(
            &egress::config::ProxyConfig::from_value(
                json!({"rules": [{"name": "r", "match_hosts": ["127.0.0.1"]}]}),
            )
            .unwrap(),
            &egress::secrets::SecretStore::default(),
            egress::policy::Options {
                allow_internal: true,
            },
        )
        .unwrap(),
    );
    let (status, body) = world
        .connect(&format!("127.0.0.1:{}", world.http_port))
        .await
        .err()
        .unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "plain HTTP where TLS was expected"
    );
    assert!(body.contains("TLS to 127.0.0.1"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_proxy_request_gets_400_and_oversized_headers_431() {
    let world = World::start().await;
    world.set_policy(json!({}));
    let exchange = |request: Vec<u8>| async move {
        let mut tcp = TcpStream::connect(world.proxy_addr).await.unwrap();
        tcp.write_all(&request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = exchange(b"NOT HTTP AT ALL\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("ember: this is an egress proxy"),
        "{answer}"
    );
    let answer = exchange(
        b"CONNECT localhost HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut big = b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend(b"\r\n\r\n");
    let answer = exchange(big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_destinations_are_refused_without_the_test_override() {
    let world = World::start().await;
    let config = egress::config::ProxyConfig::from_value(json!({})).unwrap();
    let policy = egress::policy::Policy::compile(
        &config,
        &egress::secrets::SecretStore::default(),
        egress::policy::Options::default(),
    )
    .unwrap();
    world.proxy.set_policy(policy);
    for authority in [
        format!("localhost:{}", world.https_port),
        format!("127.0.0.1:{}", world.https_port),
    ] {
        let (status, _) = world.connect(&authority).await.err().unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{authority}");
    }
    let line = world.audit_line(|l| l["mode"] == "denied").await;
    assert_eq!(line["decided_by"], "internal address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_a_unix_listener() {
    let world = World::start().await;
    world.set_policy(json!({"access_control": {"allow_list": ["localhost"]}}));
    let path = world.dir.path().join("egress.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let proxy = world.proxy.clone();
    tokio::spawn(async move { proxy.serve(listener).await });
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let tunnel = connect_over(stream, &format!("localhost:{}", world.https_port))
        .await
        .unwrap();
    let tls = tls(tunnel, &world.test_ca).await.unwrap();
    let (status, _) = get(&mut client(tls).await, "localhost", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let world = World::start_with(egress::proxy::Limits {
        max_connections: 1,
        ..Default::default()
    })
    .await;
    world.set_policy(json!({"access_control": {"allow_list": ["localhost"]}}));
    let authority = format!("localhost:{}", world.https_port);
    let tunnel = world.connect(&authority).await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(300), world.connect(&authority)).await;
    assert!(second.is_err(), "the second connection waited");

    // The tunnel ends when its client goes; its slot is then free.
    drop(tunnel);
    let third = tokio::time::timeout(Duration::from_secs(5), world.connect(&authority)).await;
    assert!(third.unwrap().is_ok());
}
