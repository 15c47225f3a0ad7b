//! The seed corpus: a few inputs per target, each built from what it stands for (operations,
//! frames, files). `cargo test` checks that the committed files in `seeds/TARGET/` are these
//! (`EMBER_WRITE_SEEDS=1 cargo test seeds` writes them) and that each runs through its target.

use agent_protocol::{
    encode as frame, DirEntry, ErrorKind, ExecRequest, FileKind, FileStat, Reply, ReplyBody, Request, RequestBody, User,
};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vmm::devices::virtio::vsock::{
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
};

use crate::agent_client::{Id, Record};
use crate::guest::{blk_request, Addr, GuestOp, Len, F_WRITE};
use crate::vsock::{Hdr, Port};
use crate::{agent_client, api_models, qcow2, virtio_blk, virtio_mmio, vsock};

/// Every target's name, as its binary in `fuzz_targets/` is called.
pub const TARGETS: [&str; 10] = [
    "agent_client",
    "agent_protocol",
    "agent_server",
    "api_http",
    "api_models",
    "qcow2",
    "snapshot",
    "virtio_blk",
    "virtio_mmio",
    "vsock",
];

/// Runs `data` through `target`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "agent_client" => crate::agent_client::run(data),
        "agent_protocol" => crate::agent_protocol::run(data),
        "agent_server" => crate::agent_server::run(data),
        "api_http" => crate::api_http::run(data),
        "api_models" => crate::api_models::run(data),
        "qcow2" => crate::qcow2::run(data),
        "snapshot" => crate::snapshot::run(data),
        "virtio_blk" => crate::virtio_blk::run(data),
        "virtio_mmio" => crate::virtio_mmio::run(data),
        "vsock" => crate::vsock::run(data),
        other => panic!("no fuzz target {other}"),
    }
}

pub struct SeedFile {
    pub target: &'static str,
    pub name: &'static str,
    pub data: Vec<u8>,
}

fn seed(target: &'static str, name: &'static str, data: Vec<u8>) -> SeedFile {
    SeedFile { target, name, data }
}

pub fn blk_configs() -> Vec<(virtio_blk::Config, Vec<virtio_blk::Op>)> {
    use virtio_blk::Op;
    let g = |ops: Vec<GuestOp>| ops.into_iter().map(Op::Guest).collect::<Vec<_>>();
    let config = virtio_blk::Config { read_only: false, event_idx: true, queue_log2: 8, sectors: 64 };
    let mut rw = g(blk_request(0, VIRTIO_BLK_T_OUT, 3, 2, false));
    rw.push(Op::Notify);
    rw.extend(g(blk_request(3, VIRTIO_BLK_T_IN, 3, 2, false)));
    rw.push(Op::Notify);
    let mut indirect = g(blk_request(0, VIRTIO_BLK_T_IN, 1, 4, true));
    indirect.extend(g(blk_request(1, VIRTIO_BLK_T_GET_ID, 0, 0, true)));
    indirect.extend(g(blk_request(2, VIRTIO_BLK_T_FLUSH, 0, 0, false)));
    indirect.push(Op::Notify);
    // A read-only disk, a write, then a chain whose status byte is at the top of the address
    // space, and a reset.
    let mut hostile = g(blk_request(0, VIRTIO_BLK_T_OUT, 0, 1, false));
    hostile.push(Op::Guest(GuestOp::Desc {
        table: 0,
        slot: 10,
        addr: Addr::Top(0),
        len: Len::Bytes(256),
        flags: F_WRITE,
        next: 0,
    }));
    hostile.push(Op::Guest(GuestOp::Publish { head: 10 }));
    hostile.extend([Op::Notify, Op::Reset]);
    vec![
        (config, rw),
        (virtio_blk::Config { event_idx: false, queue_log2: 4, ..config }, indirect),
        (virtio_blk::Config { read_only: true, ..config }, hostile),
    ]
}

pub fn mmio_inputs() -> Vec<(bool, Vec<virtio_mmio::Op>)> {
    use virtio_mmio::{handshake, reg, Op};
    let features = (1 << 28) | (1 << 29) | (1 << 9) | (1 << 2) | (1 << 1);
    let notify = Op::Write { reg: reg(0x50), value: 0 };
    let mut running = handshake(features, 8);
    running.extend(blk_request(0, VIRTIO_BLK_T_IN, 2, 1, false).into_iter().map(Op::Guest));
    running.extend([notify, Op::Read { reg: reg(0x60) }, Op::Write { reg: reg(0x64), value: 1 }, Op::SaveRestore]);
    running.extend(blk_request(3, VIRTIO_BLK_T_OUT, 2, 1, true).into_iter().map(Op::Guest));
    running.push(notify);
    let mut reset = handshake(0, 4);
    reset.extend([
        Op::Access { offset: 0x100, len: 2, value: 0, write: false },
        Op::Write { reg: reg(0x70), value: 0 },
        Op::SaveRestore,
    ]);
    reset.extend(handshake(1 << 29, 2));
    vec![(false, running), (true, reset)]
}

pub fn vsock_inputs() -> Vec<(bool, Vec<vsock::Op>)> {
    use vsock::Op;
    let guest = Port::Guest(0);
    let listener = Port::Listener(0);
    let tx = |hdr: Hdr, payload: u16| Op::Tx { hdr, payload, frags: 0 };
    let host_events = Op::HostEvents;
    // The guest connects to a host listener, sends data (in fragments), reads, shuts down.
    let to_host = vec![
        Op::Listen { port: 0 },
        Op::Rx { n: 3, data: 4096, split: true },
        tx(Hdr::guest(guest, listener, OP_REQUEST), 0),
        Op::Notify { queue: 1 },
        host_events,
        Op::Accept,
        Op::HostWrite { stream: 0, len: 100 },
        host_events,
        Op::Tx { hdr: Hdr::guest(guest, listener, OP_RW), payload: 3000, frags: 3 },
        tx(Hdr::guest(guest, listener, OP_RW), 10),
        Op::Notify { queue: 1 },
        host_events,
        Op::HostRead { stream: 0 },
        tx(Hdr { flags: SHUTDOWN_BOTH, ..Hdr::guest(guest, listener, OP_SHUTDOWN) }, 0),
        Op::Notify { queue: 1 },
        host_events,
    ];
    // A host program connects to a guest port; the guest answers, data flows both ways, the
    // credit moves, the transport resets.
    let assigned = Port::Assigned(0);
    let from_host = vec![
        Op::Rx { n: 7, data: 65535, split: false },
        Op::Connect { port: guest, garbage: None },
        host_events,
        tx(Hdr::guest(guest, assigned, OP_RESPONSE), 0),
        Op::Notify { queue: 1 },
        host_events,
        Op::HostWrite { stream: 0, len: 2000 },
        host_events,
        tx(Hdr { buf_alloc: 4096, fwd_cnt: 2000, ..Hdr::guest(guest, assigned, OP_CREDIT_UPDATE) }, 0),
        tx(Hdr::guest(guest, assigned, OP_RW), 500),
        Op::Notify { queue: 1 },
        Op::HostClose { stream: 0, how: 1 },
        host_events,
        Op::Event { len: 8 },
        Op::TransportReset,
        Op::ReadCid,
        Op::Notify { queue: 2 },
        host_events,
    ];
    // Garbage: a bad CONNECT line, an RST for nothing, packets with lying headers and CIDs,
    // a chain outside memory, a driver reset.
    let hostile = vec![
        Op::Connect { port: guest, garbage: Some(0x0a41_4141_4141_4141) },
        tx(Hdr::guest(Port::Guest(1), Port::Raw(7), OP_RST), 0),
        tx(Hdr { len_lie: Some(u32::MAX), ..Hdr::guest(guest, listener, OP_RW) }, 16),
        tx(Hdr { src_cid: Some(2), dst_cid: Some(3), stream: false, ..Hdr::guest(guest, listener, OP_REQUEST) }, 0),
        Op::Chain { queue: 1, addr: Addr::Top(20), len: Len::Raw(64), flags: 0 },
        Op::Notify { queue: 1 },
        host_events,
        Op::Reset,
        host_events,
    ];
    vec![(false, to_host), (true, from_host), (false, hostile)]
}

fn reply(id: u64, body: ReplyBody) -> Vec<u8> {
    frame(&Reply { id, body }).expect("a reply encodes")
}

fn request(id: u64, body: RequestBody) -> Vec<u8> {
    frame(&Request { id, body }).expect("a request encodes")
}

fn stat(kind: FileKind) -> FileStat {
    FileStat { kind, size: 3, mode: 0o644, uid: 0, gid: 0, mtime_ns: 1 }
}

fn body(b: ReplyBody) -> Vec<u8> {
    postcard::to_stdvec(&b).expect("a reply body encodes")
}

fn agent_protocol_seeds() -> Vec<SeedFile> {
    let exec = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec![("A".into(), "b".into())],
        cwd: Some("/tmp".into()),
        user: Some(User::Name("nobody".into())),
        stdin: true,
        timeout_ms: Some(1000),
        pty: Some(agent_protocol::PtySize { rows: 24, cols: 80 }),
        ..Default::default()
    };
    let mut requests = vec![1u8];
    requests.extend(request(1, RequestBody::Exec(exec)));
    requests.extend(request(2, RequestBody::WriteFile { path: "/tmp/f".into(), mode: 0o644, create_parents: true }));
    requests.extend(request(2, RequestBody::FileData { data: vec![1; 100] }));
    requests.extend(request(3, RequestBody::AddEntropy { data: vec![7; 32], entropy_bits: 256 }));
    let mut replies = vec![6u8];
    replies.extend(reply(
        1,
        ReplyBody::Health { protocol_version: 2, agent_version: "0.1.0".into(), uptime_ms: 5, running_execs: 1 },
    ));
    replies.extend(reply(1, ReplyBody::Stat(stat(FileKind::File))));
    replies.extend(reply(
        1,
        ReplyBody::DirEntries { entries: vec![DirEntry { name: "a".into(), stat: stat(FileKind::Dir) }], last: true },
    ));
    replies.extend(reply(0, ReplyBody::Error { kind: ErrorKind::MalformedFrame, message: "bad".into() }));
    vec![seed("agent_protocol", "requests", requests), seed("agent_protocol", "replies", replies)]
}

fn agent_server_seeds() -> Vec<SeedFile> {
    let mut session = vec![7u8];
    session.extend(request(1, RequestBody::Hello { protocol_version: agent_protocol::PROTOCOL_VERSION }));
    session.extend(request(2, RequestBody::Health));
    session.extend(request(3, RequestBody::Stdin { data: b"data".to_vec() }));
    session.extend(request(3, RequestBody::StdinClose));
    session.extend(request(4, RequestBody::Resize(agent_protocol::PtySize { rows: 1, cols: 2 })));
    session.extend(request(5, RequestBody::Signal { signal: 9, group: true }));
    session.extend(request(6, RequestBody::FileData { data: vec![0; 10] }));
    session.extend(request(6, RequestBody::FileEnd));
    session.extend(request(7, RequestBody::PowerOff));
    session.extend(request(0, RequestBody::Health));
    let mut broken = vec![0u8];
    broken.extend(request(1, RequestBody::Hello { protocol_version: 99 }));
    // A frame from a newer host (an unknown variant), garbage, then a frame cut short.
    let mut unknown = postcard::to_stdvec(&300u64).expect("an id encodes");
    unknown.extend([0xc8, 0x01]);
    broken.extend((unknown.len() as u32).to_le_bytes());
    broken.extend(unknown);
    broken.extend([3, 0, 0, 0, 0xff, 0xff, 0xff]);
    broken.extend([100, 0, 0, 0, 1, 2]);
    vec![seed("agent_server", "session", session), seed("agent_server", "broken", broken)]
}

pub fn client_inputs() -> Vec<(&'static str, u8, Vec<Record>)> {
    let own = |b: ReplyBody| Record::Reply(Id::Own, body(b));
    let health =
        ReplyBody::Health { protocol_version: 2, agent_version: "0.1.0".into(), uptime_ms: 9, running_execs: 0 };
    vec![
        ("health", 1, vec![Record::Reply(Id::Plus(1), body(ReplyBody::Ok)), own(health)]),
        (
            "exec",
            2,
            vec![
                own(ReplyBody::Started { pid: 42 }),
                own(ReplyBody::Stdout { data: b"out".to_vec() }),
                own(ReplyBody::Stderr { data: b"err".to_vec() }),
                own(ReplyBody::Ok),
                own(ReplyBody::Exit { code: 3 }),
            ],
        ),
        ("download", 6, vec![own(ReplyBody::FileData { data: vec![5; 300] }), own(ReplyBody::FileEnd { size: 300 })]),
        (
            "list",
            8,
            vec![
                own(ReplyBody::DirEntries {
                    entries: vec![DirEntry { name: "x".into(), stat: stat(FileKind::Symlink) }],
                    last: false,
                }),
                own(ReplyBody::DirEntries { entries: Vec::new(), last: true }),
            ],
        ),
        (
            "identity",
            11,
            vec![
                own(ReplyBody::Ok),
                Record::Reply(Id::Plus(1), body(ReplyBody::Ok)),
                Record::Reply(
                    Id::Plus(2),
                    body(ReplyBody::Error { kind: ErrorKind::PermissionDenied, message: "no".into() }),
                ),
            ],
        ),
        (
            "upload",
            5,
            vec![Record::Reply(
                Id::Connection,
                body(ReplyBody::Error { kind: ErrorKind::FrameTooLarge, message: "big".into() }),
            )],
        ),
        ("connect", agent_client::CALLS - 1, vec![Record::Raw(b"OK 1073741824\n".to_vec())]),
    ]
}

fn api_models_inputs() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    vec![
        ("machine_config", "PUT", "/machine-config", r#"{"vcpu_count":2,"mem_size_mib":1024,"smt":false}"#),
        (
            "drive",
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/r.qcow2","is_root_device":true,"is_read_only":false,"format":"qcow2"}"#,
        ),
        ("patch_drive", "PATCH", "/drives/rootfs", r#"{"drive_id":"rootfs","path_on_host":"/new.qcow2"}"#),
        (
            "load",
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"},"resume_vm":true,"drive_overrides":[{"index":0,"path_on_host":"d","is_read_only":true}],"vsock_override":{"guest_cid":9,"uds_path":"v"}}"#,
        ),
        ("create", "PUT", "/snapshot/create", r#"{"snapshot_type":"Full","snapshot_path":"s","mem_file_path":"m"}"#),
        ("vsock", "PUT", "/vsock", r#"{"guest_cid":3,"uds_path":"/v.sock"}"#),
        (
            "meta",
            "GET",
            "/",
            r#"{"meta_version":2,"ember_version":"0.1.0","state_format":4,"mem_size_bytes":268435456,"vcpu_count":2,"drives":[{"drive_id":"rootfs","is_root_device":true,"is_read_only":false,"size_bytes":1073741824,"format":"qcow2"}],"vsock_cid":3}"#,
        ),
    ]
}

fn api_http_seeds() -> Vec<SeedFile> {
    let body = r#"{"vcpu_count":1,"mem_size_mib":128}"#;
    let mut pipelined = vec![4u8 << 1];
    pipelined.extend(format!("PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).bytes());
    pipelined.extend(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /machine-config HTTP/1.0\r\n\r\n");
    let mut expect = vec![0u8];
    expect.extend(
        format!(
            "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nConnection: keep-alive\r\nContent-Length: 31\r\n\r\n{}",
            r#"{"action_type":"InstanceStart"}"#
        )
        .bytes(),
    );
    expect.extend(b"PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut response = vec![1u8];
    response
        .extend(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"id\":\"fuzz\"}");
    vec![
        seed("api_http", "pipelined", pipelined),
        seed("api_http", "continue", expect),
        seed("api_http", "response", response),
    ]
}

/// A qcow2 v3 image of 1 MiB over `base.raw`, with standard L2 entries and 4 KiB clusters
/// (cluster 0 header, 1 refcount table, 2 refcount block, 3 L1, 4 L2, 5 data), or with
/// extended entries and 16 KiB clusters (the first subcluster of the first cluster written).
pub fn qcow2_image(extended: bool) -> Vec<u8> {
    let bits: u32 = if extended { 14 } else { 12 };
    let cs = 1u64 << bits;
    let mut f = vec![0u8; 6 * cs as usize];
    let mut put = |at: u64, bytes: &[u8]| f[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    let (name, format) = (b"base.raw", b"raw");
    let name_at: u64 = 104 + 8 + 8 + 8;
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(8, &name_at.to_be_bytes());
    put(16, &(name.len() as u32).to_be_bytes());
    put(20, &bits.to_be_bytes());
    put(24, &qcow2::BASE_SIZE.to_be_bytes());
    put(36, &1u32.to_be_bytes());
    put(40, &(3 * cs).to_be_bytes());
    put(48, &cs.to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(72, &(if extended { 1u64 << 4 } else { 0 }).to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &104u32.to_be_bytes());
    put(104, &0xe279_2acau32.to_be_bytes());
    put(108, &(format.len() as u32).to_be_bytes());
    put(112, format);
    put(name_at, name);
    put(cs, &(2 * cs).to_be_bytes());
    for i in 0..6u64 {
        put(2 * cs + 2 * i, &1u16.to_be_bytes());
    }
    let copied = 1u64 << 63;
    put(3 * cs, &((4 * cs) | copied).to_be_bytes());
    put(4 * cs, &((5 * cs) | copied).to_be_bytes());
    if extended {
        put(4 * cs + 8, &1u64.to_be_bytes());
    }
    put(5 * cs, &[0xab; 512]);
    f
}

fn qcow2_seeds() -> Vec<SeedFile> {
    use qcow2::IoOp;
    let ops = [
        IoOp { kind: 0, sector: 0, sectors: 16, fill: 0 },
        IoOp { kind: 1, sector: 9, sectors: 3, fill: 0x5a },
        IoOp { kind: 1, sector: 1000, sectors: 40, fill: 2 },
        IoOp { kind: 2, sector: 0, sectors: 0, fill: 0 },
        IoOp { kind: 0, sector: 8, sectors: 8, fill: 1 },
    ];
    vec![
        seed("qcow2", "standard", qcow2::encode(false, &ops, &qcow2_image(false))),
        seed("qcow2", "extended", qcow2::encode(false, &ops, &qcow2_image(true))),
        seed("qcow2", "read_only", qcow2::encode(true, &ops[..1], &qcow2_image(false))),
    ]
}

pub fn all() -> Vec<SeedFile> {
    let mut out = Vec::new();
    for ((config, ops), name) in blk_configs().into_iter().zip(["rw", "indirect", "hostile"]) {
        out.push(seed("virtio_blk", name, virtio_blk::encode(&config, &ops)));
    }
    for ((ro, ops), name) in mmio_inputs().into_iter().zip(["running", "reset"]) {
        out.push(seed("virtio_mmio", name, virtio_mmio::encode(ro, &ops)));
    }
    for ((event_idx, ops), name) in vsock_inputs().into_iter().zip(["to_host", "from_host", "hostile"]) {
        out.push(seed("vsock", name, vsock::encode(event_idx, &ops)));
    }
    out.extend(agent_protocol_seeds());
    out.extend(agent_server_seeds());
    for (name, call, records) in client_inputs() {
        out.push(seed("agent_client", name, agent_client::encode_input(call, &records)));
    }
    out.extend(qcow2_seeds());
    for (vcpus, vsock, name) in [(1, false, "one_vcpu"), (2, true, "vsock")] {
        let body = postcard::to_stdvec(&crate::snapshot::sample(vcpus, vsock)).expect("a state encodes");
        out.push(seed("snapshot", name, body));
    }
    out.extend(api_http_seeds());
    for (name, method, url, body) in api_models_inputs() {
        out.push(seed("api_models", name, api_models::encode(method, url, body.as_bytes())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dir(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target)
    }

    #[test]
    fn committed_seeds_are_the_generated_ones() {
        let seeds = all();
        if std::env::var_os("EMBER_WRITE_SEEDS").is_some() {
            for t in TARGETS {
                let _ = std::fs::remove_dir_all(dir(t));
                std::fs::create_dir_all(dir(t)).unwrap();
            }
            for s in &seeds {
                std::fs::write(dir(s.target).join(s.name), &s.data).unwrap();
            }
        }
        for t in TARGETS {
            let mut committed: Vec<String> = std::fs::read_dir(dir(t))
                .unwrap_or_else(|e| panic!("seeds/{t}: {e} (EMBER_WRITE_SEEDS=1 cargo test writes them)"))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            committed.sort();
            let mut generated: Vec<String> =
                seeds.iter().filter(|s| s.target == t).map(|s| s.name.to_string()).collect();
            generated.sort();
            assert_eq!(committed, generated, "seeds/{t}");
        }
        for s in &seeds {
            let on_disk = std::fs::read(dir(s.target).join(s.name)).unwrap();
            assert!(on_disk == s.data, "seeds/{}/{} differs from what it is built from", s.target, s.name);
        }
    }

    #[test]
    fn every_seed_runs_through_its_target() {
        for s in all() {
            run(s.target, &s.data);
        }
    }

    #[test]
    fn structured_seeds_decode_to_the_operations_they_were_built_from() {
        for (config, ops) in blk_configs() {
            assert_eq!(virtio_blk::decode(&virtio_blk::encode(&config, &ops)), Some((config, ops)));
        }
        for (ro, ops) in mmio_inputs() {
            assert_eq!(virtio_mmio::decode(&virtio_mmio::encode(ro, &ops)), Some((ro, ops)));
        }
        for (event_idx, ops) in vsock_inputs() {
            assert_eq!(vsock::decode(&vsock::encode(event_idx, &ops)), Some((event_idx, ops)));
        }
        for (_, call, records) in client_inputs() {
            assert_eq!(agent_client::decode_input(&agent_client::encode_input(call, &records)), Some((call, records)));
        }
    }

    /// The seeds' writers agree with `arbitrary` for every variant, not only those the seeds
    /// use: whatever random bytes decode to writes back to bytes that decode to the same.
    #[test]
    fn writers_agree_with_arbitrary_on_random_inputs() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let data: Vec<u8> = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Some((c, ops)) = virtio_blk::decode(&data) {
                assert_eq!(virtio_blk::decode(&virtio_blk::encode(&c, &ops)), Some((c, ops)));
            }
            if let Some((ro, ops)) = virtio_mmio::decode(&data) {
                assert_eq!(virtio_mmio::decode(&virtio_mmio::encode(ro, &ops)), Some((ro, ops)));
            }
            if let Some((e, ops)) = vsock::decode(&data) {
                assert_eq!(vsock::decode(&vsock::encode(e, &ops)), Some((e, ops)));
            }
        }
    }
}
