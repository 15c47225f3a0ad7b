//! ember's error messages, each exactly as a user sees it, with its exit status: 125 for
//! ember's own failures in `exec` and `cp` (whose other statuses are the command's), 1 for
//! every other command's, 2 for another command's usage error (clap's).

mod common;

use common::{failure, now, vsock_with_agent, Ember, StandInVmm};

const EMBER_ERROR: Option<i32> = Some(125);

#[test]
fn a_command_not_found_is_127_in_the_words_of_a_shell() {
    let ember = Ember::new();
    let vsock = ember.state.path().join("vsock.sock");
    let _agent = vsock_with_agent(&vsock);
    let out = ember.run(&["exec", "--uds", vsock.to_str().unwrap(), "--", "nosuchcmd-ember"]);
    assert_eq!(failure(&out), ("ember: nosuchcmd-ember: command not found\n".into(), Some(127)));
}

#[test]
fn a_missing_working_directory_is_named_without_protocol_words() {
    let ember = Ember::new();
    let vsock = ember.state.path().join("vsock.sock");
    let _agent = vsock_with_agent(&vsock);
    let out = ember.run(&["exec", "--uds", vsock.to_str().unwrap(), "--cwd", "/nope-ember", "--", "true"]);
    assert_eq!(failure(&out), ("ember: error: no directory /nope-ember in the sandbox\n".into(), EMBER_ERROR));
}

#[test]
fn exec_takes_the_command_with_or_without_dashes_as_docker_exec_does() {
    let ember = Ember::new();
    let dir = ember.sandbox("sb1", 0, now());
    let _vmm = StandInVmm::start(&dir);
    let pid = _vmm.0.id();
    ember.sandbox("sb1", pid, now());
    let _agent = vsock_with_agent(&dir.join("vsock.sock"));
    for args in [
        &["exec", "sb1", "sh", "-c", "echo $0 -c", "x"][..],
        &["exec", "sb1", "--", "sh", "-c", "echo $0 -c", "x"],
        &["exec", "--env", "A=x", "sb1", "sh", "-c", "echo $A -c"],
        &["exec", "sb1", "--env", "A=x", "sh", "-c", "echo $A -c"],
        &["exec", "sb1", "--env", "A=x", "--", "sh", "-c", "echo $A -c"],
    ] {
        let out = ember.run(args);
        assert_eq!((String::from_utf8_lossy(&out.stdout).as_ref(), out.status.code()), ("x -c\n", Some(0)), "{args:?}: {out:?}");
    }
    // Options after the command's first word are the command's.
    let out = ember.run(&["exec", "sb1", "echo", "--cwd", "/nope"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "--cwd /nope\n");
    // With --uds there is no name: the first word is the command.
    let uds = dir.join("vsock.sock");
    let out = ember.run(&["exec", "--uds", uds.to_str().unwrap(), "echo", "uds"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "uds\n");
    let out = ember.run(&["exec", "--uds", uds.to_str().unwrap(), "--", "echo", "-n", "uds"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "uds");
    // A flag ember does not know, before the command, is refused as one.
    let (stderr, status) = failure(&ember.run(&["exec", "sb1", "--workdir", "/", "ls"]));
    assert!(stderr.starts_with("error: unexpected argument '--workdir' found"), "{stderr}");
    assert_eq!(status, EMBER_ERROR);
    let out = ember.run(&["exec", "sb1"]);
    let expected = "ember: error: no command given: put it after the sandbox's name, `ember exec NAME [--] COMMAND [ARGS...]`\n";
    assert_eq!(failure(&out), (expected.into(), EMBER_ERROR));
}

#[test]
fn a_sandbox_whose_vmm_died_is_not_running() {
    let ember = Ember::new();
    // No process has this pid: Linux's pids stay below 2^22.
    ember.sandbox("sb1", i32::MAX as u32, now());
    let expected = "ember: error: sandbox sb1 is not running: its VMM has exited (`ember rm sb1` removes what is left)\n";
    assert_eq!(failure(&ember.run(&["exec", "sb1", "--", "true"])), (expected.into(), EMBER_ERROR));
    assert_eq!(failure(&ember.run(&["cp", "sb1:/etc/hostname", "-"])), (expected.into(), EMBER_ERROR));
}

#[test]
fn an_unknown_sandbox_points_at_ls_with_one_status_per_kind_of_command() {
    let ember = Ember::new();
    let expected = "ember: error: there is no sandbox named nosuch (`ember ls` lists them)\n";
    assert_eq!(failure(&ember.run(&["exec", "nosuch", "--", "true"])), (expected.into(), EMBER_ERROR));
    assert_eq!(failure(&ember.run(&["cp", "nosuch:/x", "-"])), (expected.into(), EMBER_ERROR));
    let elsewhere = [&["rm", "nosuch"][..], &["stats", "nosuch"], &["fork", "nosuch"], &["snapshot", "nosuch", "/tmp/nope-ember"]];
    for args in elsewhere {
        assert_eq!(failure(&ember.run(args)), (expected.into(), Some(1)), "{args:?}");
    }
}

#[test]
fn usage_errors_are_125_in_exec_and_cp_and_2_elsewhere() {
    let ember = Ember::new();
    for args in [&["exec", "--no-such-flag", "sb"][..], &["cp", "only-one"]] {
        let (stderr, status) = failure(&ember.run(args));
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert_eq!(status, EMBER_ERROR, "{args:?}: {stderr}");
    }
    assert_eq!(failure(&ember.run(&["ls", "--no-such-flag"])).1, Some(2));
    assert_eq!(ember.run(&["exec", "--help"]).status.code(), Some(0), "help is no error");
}

#[test]
fn a_copy_into_a_missing_directory_names_it_not_a_temporary_file() {
    let ember = Ember::new();
    let vsock = ember.state.path().join("vsock.sock");
    let _agent = vsock_with_agent(&vsock);
    let out = ember.run(&["cp", "--uds", vsock.to_str().unwrap(), "x:/etc/hostname", "/nonexistent-ember/dir/out.txt"]);
    let expected =
        "ember: error: cannot write /nonexistent-ember/dir/out.txt: there is no directory /nonexistent-ember/dir on this host\n";
    assert_eq!(failure(&out), (expected.into(), EMBER_ERROR));
    // A copy that works leaves no temporary file behind either.
    let into = ember.state.path().join("copied");
    let out = ember.run(&["cp", "--uds", vsock.to_str().unwrap(), "x:/etc/hostname", into.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&into).unwrap(), std::fs::read("/etc/hostname").unwrap());
    let names: Vec<_> = std::fs::read_dir(ember.state.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains("ember-partial")), "{names:?}");
}

#[test]
fn memory_that_is_no_multiple_of_2_mib_is_refused_before_anything_is_made() {
    let ember = Ember::new();
    let home = ember.state.path().join("home");
    for (args, nearest) in [
        (&["run", "--detach", "--mem-mib", "255"][..], "255 is not a multiple of 2 MiB: give 254 or 256"),
        (&["run", "--detach", "--mem-mib", "0"], "0 is not a positive multiple of 2 MiB: give 2 or more"),
        (&["template", "create", "t", "--mem-mib", "257"], "257 is not a multiple of 2 MiB: give 256 or 258"),
    ] {
        let out = ember.command(args).env("EMBER_HOME", &home).output().unwrap();
        let (stderr, status) = failure(&out);
        let first = stderr.lines().next().unwrap_or_default();
        assert_eq!(first, format!("error: invalid value '{}' for '--mem-mib <MEM_MIB>': {nearest}", args[args.len() - 1]));
        assert!(!stderr.contains("making template"), "{stderr}");
        assert_eq!(status, Some(2), "{stderr}");
        assert!(!ember.state.path().join("templates").exists() && !ember.state.path().join("sandboxes").exists());
    }
}

#[test]
fn an_image_that_is_no_name_or_file_says_what_is_accepted() {
    let ember = Ember::new();
    let out = ember.command(&["template", "create", "t", "--image", "python"]).env("EMBER_HOME", ember.state.path()).output().unwrap();
    let expected = "ember: error: there is no image python: give --image default, an image's NAME:TAG \
                    (`ember image ls` lists them) or the path of an image file\n";
    assert_eq!(failure(&out), (expected.into(), Some(1)));
}
