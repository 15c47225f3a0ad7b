//! `ember-agent`: listens on AF_VSOCK (or a Unix socket, for testing on the host) and serves
//! the protocol of PROTOCOL.md, one thread per connection (threads are kept for later ones),
//! at most `server::MAX_CONNECTIONS` connections at once.
//!
//! Usage: `ember-agent [--port N] [--unix PATH] [--init]` (see --help).
//! `--init` (implied when the agent is PID 1): mount /proc, /sys, /dev, /dev/pts, /dev/shm,
//! /run, /tmp, set a default PATH, and honour `PowerOff`. The agent is always a child
//! subreaper, and its reaper thread reaps every child, so orphans never stay zombies.

use std::os::unix::net::UnixListener;

use anyhow::{Context, Result};
use clap::Parser;
use ember_agent::server::{Config, Server};
use ember_agent::sys;
use tracing::{info, warn};

/// The agent inside an ember sandbox: serves the host's requests (guest-agent/PROTOCOL.md).
#[derive(Parser)]
#[command(name = "ember-agent", version = ember_agent::server::AGENT_VERSION)]
struct Args {
    /// vsock port to listen on
    #[arg(long, default_value_t = agent_protocol::DEFAULT_PORT)]
    port: u32,
    /// Serve a Unix socket at PATH instead of vsock (for tests on the host)
    #[arg(long, value_name = "PATH")]
    unix: Option<String>,
    /// Act as init: mount the usual file systems and honour PowerOff (implied as PID 1)
    #[arg(long)]
    init: bool,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    args.init |= std::process::id() == 1;
    if args.init {
        sys::init_mounts();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = sys::set_subreaper() {
        warn!("PR_SET_CHILD_SUBREAPER: {e}");
    }
    // Start the reaper now, so that zombies are collected even before the first exec.
    sys::Reaper::get();
    // Before the first request, so that no command sees the disk's end unused.
    match sys::grow_root() {
        Ok(Some((from, to))) => info!("grew the root file system from {from} to {to} blocks to fill its disk"),
        Ok(None) => {}
        Err(e) => warn!("cannot grow the root file system to its disk: {e}"),
    }
    let config = Config {
        allow_power_off: args.init,
        ..Config::default()
    };
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).with_context(|| format!("bind {path}"))?;
        info!("listening on unix:{path}");
        let server = Server::new(config);
        loop {
            match l.accept() {
                Ok((s, _)) => server.accept(s),
                Err(e) => warn!("accept: {e}"),
            }
        }
    }
    let l = sys::VsockListener::bind(args.port)
        .with_context(|| format!("bind vsock port {}", args.port))?;
    info!("listening on vsock port {}", args.port);
    let server = Server::new(config);
    loop {
        match l.accept() {
            Ok(s) => server.accept(s),
            Err(e) => {
                warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
