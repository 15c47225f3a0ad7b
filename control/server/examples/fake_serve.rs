//! Test-only: the server over the fake backend (`tests/fake`), for the SDK tests in
//! `tests/sdk/` on a host without ember's sandboxes. Not part of the `ember` binary.
//!
//!     cargo run -p ember-server --example fake_serve -- [--listen ADDR] [--keys FILE] [--pool SNAPSHOT=N]
//!
//! Prints `listening on http://ADDR` once it accepts connections.

#[path = "../tests/fake/mod.rs"]
mod fake;

use std::io::Write;
use std::sync::Arc;

use server::tenants::Tenants;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:0".to_string();
    let mut keys = None;
    let mut pools = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen ADDR"))?
            }
            "--keys" => keys = Some(args.next().ok_or_else(|| anyhow::anyhow!("--keys FILE"))?),
            "--pool" => pools.push(
                server::pool::PoolSpec::parse(&args.next().unwrap_or_default())
                    .map_err(anyhow::Error::msg)?,
            ),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let tenants = match keys {
        Some(path) => Tenants::parse(&std::fs::read_to_string(&path)?)?,
        None => Tenants::open(),
    };
    let root = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-fake-serve-")?;
    let backend = Arc::new(fake::FakeBackend::new(root.as_path()));
    let mut config = server::Config::new(tenants);
    config.output_capacity = 1 << 20;
    config.pools = pools;
    let state = server::AppState::new(backend, config);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    server::check_listen(&listener.local_addr()?, &state.config.tenants)
        .map_err(anyhow::Error::msg)?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    server::serve(listener, state, server::until_signalled()).await?;
    Ok(())
}
