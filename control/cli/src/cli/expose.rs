//! `ember expose NAME PORT [--ttl S]` / `ember unexpose NAME [PORT]`: service URLs for a
//! port of one of this user's sandboxes, served by this user's `ember serve` (the one HTTP
//! listener for every sandbox, see `server::host_sandboxes`). The server is found, and the
//! caller proven to be its user, by the `local.json` it writes into its state directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use server::local::{LocalAccess, Method};
use serde_json::{json, Value};

#[derive(Args)]
pub struct ExposeArgs {
    /// The sandbox
    name: String,
    /// The TCP port in the sandbox (on its loopback)
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Seconds the URL's token lasts (at most 86400)
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    ttl: u64,
    /// The server's URL [default: the one this user's `ember serve` wrote in its local.json]
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Print the server's whole answer as JSON (service_url, browser_url, token, expires_at)
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UnexposeArgs {
    /// The sandbox
    name: String,
    /// Only the URLs of this port [default: all of the sandbox's]
    port: Option<u16>,
    /// The server's URL [default: the one this user's `ember serve` wrote in its local.json]
    #[arg(long, value_name = "URL")]
    server: Option<String>,
}

fn access(server: Option<String>, dir: &std::path::Path) -> anyhow::Result<LocalAccess> {
    let mut access = LocalAccess::read(dir)?;
    if let Some(url) = server {
        access.url = url;
    }
    Ok(access)
}

/// Sends one request to the server and waits for its answer.
fn send(access: &LocalAccess, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    Ok(runtime.block_on(access.request(method, path, body))?)
}

fn path(name: &str) -> String {
    format!("/api/v2/sandboxes/local/{name}/service-url")
}

pub fn expose(args: ExposeArgs, server_dir: PathBuf) -> anyhow::Result<()> {
    let answer = mint(&args, &server_dir)?;
    if args.json {
        outln!("{answer}");
        return Ok(());
    }
    let text = |k: &str| answer[k].as_str().unwrap_or_default().to_string();
    // The browser URL works alone (it sets the token as a cookie): stdout; the rest, stderr.
    outln!("{}", text("browser_url"));
    eprintln!(
        "ember: port {} of sandbox {} until {}; for programs: {}/ with header X-Langsmith-Sandbox-Service-Token: {} (or a bearer token); `ember unexpose {}` ends it",
        args.port,
        args.name,
        text("expires_at"),
        text("service_url"),
        text("token"),
        args.name,
    );
    if let Some(host) = answer["host_browser_url"].as_str() {
        eprintln!("ember: also at a host of its own: {host}");
    }
    Ok(())
}

fn mint(args: &ExposeArgs, server_dir: &Path) -> anyhow::Result<Value> {
    let access = access(args.server.clone(), server_dir)?;
    let body = json!({"port": args.port, "expires_in_seconds": args.ttl});
    send(&access, Method::POST, &path(&args.name), Some(body))
}

pub fn unexpose(args: UnexposeArgs, server_dir: PathBuf) -> anyhow::Result<()> {
    let revoked = revoke(&args, &server_dir)?;
    eprintln!("ember: {revoked} service URL token(s) of sandbox {} revoked", args.name);
    Ok(())
}

fn revoke(args: &UnexposeArgs, server_dir: &Path) -> anyhow::Result<u64> {
    let access = access(args.server.clone(), server_dir)?;
    let query = args.port.map(|p| format!("?port={p}")).unwrap_or_default();
    let answer = send(&access, Method::DELETE, &format!("{}{query}", path(&args.name)), None)?;
    Ok(answer["revoked"].as_u64().unwrap_or(0))
}

#[cfg(test)]
#[path = "../../../server/tests/fake/mod.rs"]
mod fake;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// A GET of the service URL's root with `token`: the whole HTTP answer.
    fn get(service_url: &str, token: &str) -> String {
        let rest = service_url.strip_prefix("http://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap());
        let mut s = std::net::TcpStream::connect(authority).unwrap();
        let request = format!("GET {path}/ HTTP/1.1\r\nhost: {authority}\r\nx-langsmith-sandbox-service-token: {token}\r\nconnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn expose_prints_a_url_that_serves_the_port_until_unexpose() {
        let dir = std::env::temp_dir().join(format!("ember-expose-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let args = |name: &str, port: u16| ExposeArgs { name: name.into(), port, ttl: 60, server: None, json: false };
        let e = mint(&args("web", 80), &dir).unwrap_err();
        assert!(format!("{e:#}").contains("no `ember serve`"), "{e:#}");

        // `ember serve` over the fake backend, with a sandbox `web` whose port 80 is `service`.
        let backend = Arc::new(fake::FakeBackend::new(&dir));
        backend.add("web");
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = service.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in service.incoming() {
                let mut s = s.unwrap();
                let _ = s.read(&mut [0u8; 4096]);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello");
            }
        });
        let mut config = server::Config::new(server::tenants::Tenants::open());
        let key = server::local::new_key();
        config.local_key = Some(key.clone());
        let state = server::AppState::new(backend, config);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = server::local::url_of(listener.local_addr().unwrap());
        runtime.spawn(server::serve(listener, state, std::future::pending()));
        LocalAccess { url: url.clone(), key }.write(&dir).unwrap();

        let answer = mint(&args("web", port), &dir).unwrap();
        let (service_url, token) = (answer["service_url"].as_str().unwrap(), answer["token"].as_str().unwrap());
        assert!(service_url.starts_with(&format!("{url}/services/")), "{answer}");
        assert!(answer["browser_url"].as_str().unwrap().contains("token="), "{answer}");
        let served = get(service_url, token);
        assert!(served.starts_with("HTTP/1.1 200") && served.ends_with("hello"), "{served}");

        let e = mint(&args("nothing", port), &dir).unwrap_err();
        assert!(format!("{e:#}").contains("no sandbox 'nothing'"), "{e:#}");

        let unexpose = UnexposeArgs { name: "web".into(), port: Some(port), server: None };
        assert_eq!(revoke(&unexpose, &dir).unwrap(), 1);
        assert!(get(service_url, token).starts_with("HTTP/1.1 401"), "the revoked token opens nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
