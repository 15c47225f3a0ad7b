//! `ember run --detach --start` and `ember run --detach -- COMMAND`: once the sandbox is ready,
//! its image's command starts as a background exec (the image's Entrypoint, then COMMAND or
//! else its Cmd, as `docker run IMAGE [COMMAND]`), with the image's Env, WorkingDir and User.

use anyhow::Context;
use sandbox::Store;

use super::exec::{image_defaults, image_user};

/// The detached exec of `command` (or the image's own command) under the image's defaults.
pub fn background_request(defaults: image::ExecDefaults, command: &[String]) -> anyhow::Result<agent_protocol::ExecRequest> {
    let argv = defaults.argv(command).context("the image has no Entrypoint or Cmd to start: pass -- COMMAND")?;
    let user = image_user(&defaults)?;
    Ok(agent_protocol::ExecRequest { argv, env: defaults.env, cwd: defaults.cwd, user, detach: true, ..Default::default() })
}

/// Starts the command in sandbox `name`; returns its argv and its pid in the guest.
pub fn start_background(store: &Store, name: &str, command: &[String]) -> anyhow::Result<(Vec<String>, u32)> {
    let request = background_request(image_defaults(store, name)?, command)?;
    let argv = request.argv.clone();
    let stream = super::connect(&store.vsock_socket(name)?, agent_protocol::DEFAULT_PORT)?;
    let pid = agent_client::spawn_detached(stream, request).with_context(|| format!("cannot start {argv:?}"))?;
    Ok((argv, pid))
}

#[cfg(test)]
mod tests {
    use super::background_request;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_request_runs_the_image_s_command_detached_with_its_defaults() {
        let defaults = image::ExecDefaults {
            env: vec![("PORT".into(), "80".into())],
            cwd: Some("/srv".into()),
            user: Some("1000:1001".into()),
            entrypoint: v(&["/bin/app"]),
            cmd: v(&["--port", "80"]),
        };
        let r = background_request(defaults.clone(), &[]).unwrap();
        assert_eq!(r.argv, v(&["/bin/app", "--port", "80"]));
        assert!(r.detach && !r.stdin);
        assert_eq!((r.env, r.cwd), (vec![("PORT".into(), "80".into())], Some("/srv".into())));
        assert_eq!(r.user, Some(agent_protocol::User::Id { uid: 1000, gid: 1001 }));
        assert_eq!(background_request(defaults, &v(&["--port", "8080"])).unwrap().argv, v(&["/bin/app", "--port", "8080"]));
    }

    #[test]
    fn nothing_to_run_is_refused_naming_the_way_out() {
        let e = background_request(image::ExecDefaults::default(), &[]).unwrap_err();
        assert!(e.to_string().contains("-- COMMAND"), "{e}");
        let bad_user = image::ExecDefaults { user: Some("1:x".into()), cmd: v(&["true"]), ..Default::default() };
        assert!(background_request(bad_user, &[]).unwrap_err().to_string().contains("the image's user"));
    }
}
