//! Native tests of the agent, run as root on the host (see common/mod.rs): file upload,
//! download and the other file requests.

mod common;

use agent_protocol::{ErrorKind, FileKind, ReplyBody, RequestBody};

use common::*;

#[test]
fn files() {
    let d = tmpdir("files");
    let ds = d.to_str().unwrap().to_string();
    let mut c = Client::new();
    let data = pseudo_random(8 << 20, 9);
    let path = format!("{ds}/a/b/file");
    c.send(
        1,
        RequestBody::WriteFile {
            path: path.clone(),
            mode: 0o640,
            create_parents: true,
        },
    );
    for ch in data.chunks(512 << 10) {
        c.send(1, RequestBody::FileData { data: ch.to_vec() });
    }
    assert_eq!(
        c.call(1, RequestBody::FileEnd),
        ReplyBody::FileWritten {
            size: data.len() as u64
        }
    );
    assert_eq!(fnv(&std::fs::read(&path).unwrap()), fnv(&data));

    c.send(2, RequestBody::ReadFile { path: path.clone() });
    let mut back = Vec::new();
    loop {
        match c.recv().body {
            ReplyBody::FileData { data } => back.extend(data),
            ReplyBody::FileEnd { size } => {
                assert_eq!(size, data.len() as u64);
                break;
            }
            b => panic!("{b:?}"),
        }
    }
    assert_eq!(fnv(&back), fnv(&data));

    match c.call(3, RequestBody::Stat { path: path.clone() }) {
        ReplyBody::Stat(s) => {
            assert_eq!(
                (s.kind, s.size, s.mode),
                (FileKind::File, data.len() as u64, 0o640)
            )
        }
        b => panic!("{b:?}"),
    }
    let deep = format!("{ds}/x/y/z");
    // The second time, every directory exists already: with `parents` that is not an error.
    for id in [4, 5] {
        assert_eq!(c.call(id, RequestBody::Mkdir { path: deep.clone(), mode: 0o755, parents: true }), ReplyBody::Ok);
    }
    assert!(matches!(
        c.call(
            6,
            RequestBody::Mkdir {
                path: format!("{ds}/q/r"),
                mode: 0o755,
                parents: false
            }
        ),
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    match c.call(7, RequestBody::ListDir { path: ds.clone() }) {
        ReplyBody::DirEntries {
            mut entries,
            last: true,
        } => {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let names: Vec<_> = entries
                .iter()
                .map(|e| (e.name.as_str(), e.stat.kind))
                .collect();
            assert_eq!(names, [("a", FileKind::Dir), ("x", FileKind::Dir)]);
        }
        b => panic!("{b:?}"),
    }
    assert!(matches!(
        c.call(
            8,
            RequestBody::Remove {
                path: format!("{ds}/x"),
                recursive: false
            }
        ),
        ReplyBody::Error { .. }
    ));
    assert_eq!(
        c.call(
            9,
            RequestBody::Remove {
                path: format!("{ds}/x"),
                recursive: true
            }
        ),
        ReplyBody::Ok
    );
    assert_eq!(
        c.call(
            10,
            RequestBody::Remove {
                path: path.clone(),
                recursive: false
            }
        ),
        ReplyBody::Ok
    );
    assert!(matches!(
        c.call(11, RequestBody::Stat { path: path.clone() }),
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    assert!(matches!(
        c.call(12, RequestBody::ReadFile { path }),
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    std::fs::remove_dir_all(d).unwrap();
}
