//! `ember tunnel NAME REMOTE_PORT [--local ADDR:PORT]`: a local TCP listener whose every
//! connection is forwarded to a port inside the sandbox, each over a vsock connection of its
//! own to the guest agent (`Dial`), until the process is interrupted.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use clap::Args;
use sandbox::Store;

use super::connect;

#[derive(Args)]
pub struct TunnelArgs {
    /// The sandbox
    name: String,
    /// The TCP port in the sandbox (on its loopback)
    remote_port: u16,
    /// Where to listen [default: 127.0.0.1:REMOTE_PORT, or an ephemeral port when that is taken]
    #[arg(long, value_name = "ADDR:PORT")]
    local: Option<SocketAddr>,
    /// The agent's vsock port
    #[arg(long, default_value_t = agent_protocol::DEFAULT_PORT)]
    port: u32,
}

/// A copy buffer per direction of each forwarded connection.
const BUFFER: usize = 64 << 10;

pub fn tunnel(args: TunnelArgs, store: &Store) -> anyhow::Result<()> {
    let socket = store.vsock_socket(&args.name)?;
    let listener = match args.local {
        Some(addr) => TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?,
        None => TcpListener::bind(("127.0.0.1", args.remote_port))
            .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))
            .context("cannot listen on 127.0.0.1")?,
    };
    let local = listener.local_addr()?;
    // The address on stdout (for scripts), the explanation on stderr.
    outln!("{local}");
    io::stdout().flush()?;
    eprintln!("ember: forwarding {local} to port {} of sandbox {} (Ctrl-C stops)", args.remote_port, args.name);
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ember: tunnel: accept: {e}");
                continue;
            }
        };
        let (socket, name, remote, port) = (socket.clone(), args.name.clone(), args.remote_port, args.port);
        std::thread::spawn(move || {
            if let Err(e) = forward(conn, &socket, port, remote) {
                eprintln!("ember: tunnel to {name}:{remote}: {e:#}");
            }
        });
    }
    Ok(())
}

/// Dials `remote` in the guest and splices it with `local` until both directions end.
fn forward(local: TcpStream, socket: &Path, agent_port: u32, remote: u16) -> anyhow::Result<()> {
    let stream = agent_client::dial(connect(socket, agent_port)?, remote)?;
    local.set_nodelay(true)?;
    let (local_in, stream_in) = (local.try_clone()?, stream.try_clone()?);
    // A failure either way ends both: shutting both sockets wakes the other copy.
    let ends = std::sync::Arc::new((local.try_clone()?, stream.try_clone()?));
    let end = |ends: &(TcpStream, UnixStream)| {
        let _ = ends.0.shutdown(Shutdown::Both);
        let _ = ends.1.shutdown(Shutdown::Both);
    };
    let ends_too = ends.clone();
    let down = std::thread::spawn(move || {
        pump(stream_in, local, |l: &TcpStream| l.shutdown(Shutdown::Write)).inspect_err(|_| end(&ends_too))
    });
    let up = pump(local_in, stream, |s: &UnixStream| s.shutdown(Shutdown::Write)).inspect_err(|_| end(&ends));
    let down = down.join().map_err(|_| anyhow::anyhow!("the copy thread panicked"))?;
    up.and(down).context("copying")
}

/// Copies `from` to `to` until end of file, then shuts `to`'s write side (half-close).
fn pump<R: Read, W: Write>(mut from: R, mut to: W, shut: impl FnOnce(&W) -> io::Result<()>) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return shut(&to).or_else(|e| if e.kind() == io::ErrorKind::NotConnected { Ok(()) } else { Err(e) }),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A VM's vsock socket as the VMM serves it: each `CONNECT` is answered `OK` and the
    /// connection handed to the real agent, in this process.
    fn fake_vsock(path: &Path) {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let s = s.unwrap();
                let mut line = String::new();
                io::BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(line, "CONNECT 1024\n");
                (&s).write_all(b"OK 1\n").unwrap();
                std::thread::spawn(move || ember_agent::server::serve(s, &ember_agent::server::Config::default()));
            }
        });
    }

    /// A fresh directory with a fake vsock socket in it: (the directory, the socket).
    fn vsock_in(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ember-tunnel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock.sock");
        fake_vsock(&socket);
        (dir, socket)
    }

    #[test]
    fn a_forwarded_connection_carries_bytes_and_half_close_both_ways() {
        let (dir, socket) = vsock_in("forward");
        // The "guest" service: reads to end of file, then answers with what it read, reversed.
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = service.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = service.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.reverse();
            s.write_all(&got).unwrap();
        });
        // The tunnel's local side: a connection accepted from a client.
        let local = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(local.local_addr().unwrap()).unwrap();
        let (accepted, _) = local.accept().unwrap();
        let forwarding = std::thread::spawn(move || forward(accepted, &socket, 1024, remote));
        client.write_all(b"abc").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"cba", "the service saw end of file after the bytes, and its answer came back");
        forwarding.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refused_port_names_it() {
        let (dir, socket) = vsock_in("refused");
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let local = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(local.local_addr().unwrap()).unwrap();
        let (accepted, _) = local.accept().unwrap();
        let e = forward(accepted, &socket, 1024, closed).unwrap_err();
        assert!(format!("{e:#}").contains(&format!("cannot reach port {closed} in the sandbox")), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
