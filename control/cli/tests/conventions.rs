//! What ember shares with other command lines: --help without internal commands, shell
//! completions, RUST_LOG, an age in `ls`, JSON from the commands that print data.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::{now, Ember, StandInVmm};

#[test]
fn help_leaves_out_the_internal_vmm_command() {
    let out = Ember::new().run(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("  exec ") && help.contains("  completion "), "{help}");
    assert!(!help.contains("vmm "), "{help}");
    // Still there for the control plane to start.
    assert!(Ember::new().run(&["vmm", "--help"]).status.success());
}

#[test]
fn completion_scripts_name_the_user_commands_only() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Ember::new().run(&["completion", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {out:?}");
        for command in ["exec", "template", "snapshot", "completion"] {
            assert!(script.contains(command), "the {shell} script lacks {command}");
        }
        assert!(!script.contains("vmm"), "the {shell} script offers the internal vmm command");
    }
    assert_eq!(Ember::new().run(&["completion", "cp"]).status.code(), Some(2));
}

#[test]
fn rust_log_sets_the_filter_unless_ember_log_does() {
    let ember = Ember::new();
    let stderr = |vars: &[(&str, &str)]| {
        let out = ember.command(&["ls"]).envs(vars.iter().copied()).output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(stderr(&[("RUST_LOG", "debug")]).contains("started"));
    assert!(stderr(&[("EMBER_LOG", "debug")]).contains("started"));
    assert!(!stderr(&[("EMBER_LOG", "warn"), ("RUST_LOG", "debug")]).contains("started"), "EMBER_LOG comes first");
    assert!(!stderr(&[]).contains("started"));
}

#[test]
fn ls_shows_each_sandboxs_age() {
    let ember = Ember::new();
    ember.sandbox("young", i32::MAX as u32, now() - 5);
    ember.sandbox("old", i32::MAX as u32, now() - 3 * 3600 - 60);
    let out = ember.run(&["ls"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0][..3], ["NAME", "STATE", "AGE"], "{table}");
    assert_eq!(rows[1][..3], ["old", "Stopped", "3h"], "{table}");
    assert_eq!(rows[2][0], "young", "{table}");
    assert!(rows[2][2].ends_with('s'), "{table}");
}

#[test]
fn stats_prints_json_on_request() {
    let ember = Ember::new();
    let dir = ember.sandbox("sb", 0, now());
    let vmm = StandInVmm::start(&dir);
    ember.sandbox("sb", vmm.0.id(), now());
    // The VMM's API: FlushMetrics is answered, and the metrics file holds its last line.
    std::fs::write(dir.join("metrics.json"), "{\"utc_timestamp_ms\":1,\"vcpu\":{\"exits\":7}}\n").unwrap();
    let api = UnixListener::bind(dir.join("api.sock")).unwrap();
    std::thread::spawn(move || {
        for stream in api.incoming() {
            let mut stream = stream.unwrap();
            read_request(&mut stream);
            stream.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").unwrap();
        }
    });
    let out = ember.run(&["stats", "sb", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, serde_json::json!({ "name": "sb", "vm_exits": 7 }));
    assert_eq!(String::from_utf8_lossy(&ember.run(&["stats", "sb"]).stdout), "vm exits: 7\n");
}

/// Reads one HTTP request, its body included (by its Content-Length).
fn read_request(stream: &mut impl Read) {
    let mut got = Vec::new();
    let mut byte = [0u8];
    while !got.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
}
