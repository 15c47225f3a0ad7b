//! `ember-agent`: listens on AF_VSOCK (or a Unix socket, for testing on the host) and serves
//! the protocol of PROTOCOL.md, one thread per connection.
//!
//! Usage: `ember-agent [--port N] [--unix PATH] [--init]`
//! `--init` (implied when the agent is PID 1): mount /proc, /sys, /dev, /dev/pts, /dev/shm,
//! /run, /tmp, set a default PATH, and honour `PowerOff`. The agent is always a child
//! subreaper, and its reaper thread reaps every child, so orphans never stay zombies.

use std::os::unix::net::UnixListener;

use anyhow::{bail, Context, Result};
use ember_agent::server::{serve, Config};
use ember_agent::sys;
use ember_agent::Connection;
use tracing::{info, warn};

struct Args {
    port: u32,
    unix: Option<String>,
    init: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        port: ember_agent::DEFAULT_PORT,
        unix: None,
        init: std::process::id() == 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => {
                args.port = it
                    .next()
                    .context("--port needs a value")?
                    .parse()
                    .context("--port")?
            }
            "--unix" => args.unix = Some(it.next().context("--unix needs a path")?),
            "--init" => args.init = true,
            "--version" => {
                println!(
                    "ember-agent {} (protocol {})",
                    ember_agent::server::AGENT_VERSION,
                    ember_agent::PROTOCOL_VERSION
                );
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("usage: ember-agent [--port N] [--unix PATH] [--init]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn spawn_conn<S: Connection>(s: S, config: &Config) {
    let config = config.clone();
    let r = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(256 << 10)
        .spawn(move || {
            if let Err(e) = serve(s, &config) {
                warn!("connection: {e}");
            }
        });
    if let Err(e) = r {
        warn!("cannot start a connection thread: {e}");
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
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
    let config = Config {
        allow_power_off: args.init,
    };
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).with_context(|| format!("bind {path}"))?;
        info!("listening on unix:{path}");
        loop {
            match l.accept() {
                Ok((s, _)) => spawn_conn(s, &config),
                Err(e) => warn!("accept: {e}"),
            }
        }
    }
    let l = sys::VsockListener::bind(args.port)
        .with_context(|| format!("bind vsock port {}", args.port))?;
    info!("listening on vsock port {}", args.port);
    loop {
        match l.accept() {
            Ok(s) => spawn_conn(s, &config),
            Err(e) => {
                warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
