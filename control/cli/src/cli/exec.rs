//! `ember exec`: run a command in a sandbox, its output streamed to this terminal and this
//! process's stdin passed through, exiting with the command's status.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use agent_client::{ClientError, Exec, Outcome};
use sandbox::Store;

use super::{agent_socket, connect, error_line, terminal, EXIT_EMBER_ERROR};

#[derive(Args)]
pub struct ExecArgs {
    /// The sandbox to run the command in (none with --uds)
    #[arg(required_unless_present = "uds")]
    name: Option<String>,
    /// Instead of a sandbox name: a VM's vsock socket (the uds= of `ember run --vsock`)
    #[arg(long)]
    uds: Option<PathBuf>,
    /// The agent's vsock port
    #[arg(long, default_value_t = agent_protocol::DEFAULT_PORT)]
    port: u32,
    /// Environment variables for the command
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest [default: the image's WorkingDir, for an imported image]
    #[arg(long)]
    cwd: Option<String>,
    /// Run as this user of the guest: a name, a uid or uid:gid [default: the image's User, for
    /// an imported image; else root]
    #[arg(long, short = 'u', value_name = "USER")]
    user: Option<agent_protocol::User>,
    /// Kill the command (and everything it started) after this many seconds
    #[arg(long)]
    timeout: Option<f64>,
    /// Run the command on a pseudo-terminal (for interactive programs), of this terminal's size
    /// (24x80 if there is none); this terminal goes into raw mode while it runs
    #[arg(long, short = 't')]
    tty: bool,
    /// The command and its arguments, after NAME, with or without `--` before them (as
    /// `docker exec` takes them): everything from the first word after NAME is the command's
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not K=V"))
}

/// The exec defaults of sandbox `name`'s image; none for an image ember did not make.
pub fn image_defaults(store: &Store, name: &str) -> anyhow::Result<image::ExecDefaults> {
    Ok(image::ExecDefaults::of_image(&store.record(name)?.image)?.unwrap_or_default())
}

/// The image's User as the agent takes it.
pub fn image_user(defaults: &image::ExecDefaults) -> anyhow::Result<Option<agent_protocol::User>> {
    defaults.user.as_deref().map(str::parse).transpose().map_err(|e: String| anyhow::anyhow!("the image's user: {e}"))
}

pub fn exec(mut args: ExecArgs, store: &Store) -> anyhow::Result<ExitCode> {
    let fail = |message: String| {
        eprintln!("ember: error: {message}");
        Ok(ExitCode::from(EXIT_EMBER_ERROR))
    };
    // With --uds there is no name: the first word clap took for one is the command's.
    if args.uds.is_some() {
        args.command.splice(0..0, args.name.take());
    }
    if args.command.is_empty() {
        return fail("no command given: put it after the sandbox's name, `ember exec NAME [--] COMMAND [ARGS...]`".into());
    }
    let socket = match agent_socket(store, args.name.as_deref(), args.uds.as_ref()) {
        Ok(s) => s,
        Err(e) => return fail(error_line(&e)),
    };
    let stream = match connect(&socket, args.port) {
        Ok(s) => s,
        Err(e) => return fail(error_line(&e)),
    };
    // An imported image's Env, WorkingDir and User, under what the command line says.
    let defaults = match &args.name {
        Some(name) if args.uds.is_none() => match image_defaults(store, name) {
            Ok(d) => d,
            Err(e) => return fail(error_line(&e)),
        },
        _ => image::ExecDefaults::default(),
    };
    let user = match args.user.map(Ok).or_else(|| image_user(&defaults).transpose()).transpose() {
        Ok(u) => u,
        Err(e) => return fail(error_line(&e)),
    };
    let mut env = defaults.env;
    env.extend(args.env);
    let pty = args
        .tty
        .then(|| terminal::size(std::io::stdout().as_raw_fd()).unwrap_or(agent_protocol::PtySize { rows: 24, cols: 80 }));
    if pty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), std::env::var("TERM").unwrap_or_else(|_| "xterm".into())));
    }
    let request = agent_protocol::ExecRequest {
        argv: args.command,
        env,
        cwd: args.cwd.or(defaults.cwd),
        user,
        timeout_ms: args.timeout.map(|s| (s * 1000.0) as u64),
        pty,
        ..Default::default()
    };
    let started = Exec::start(stream, request, Some(Box::new(std::io::stdin())));
    let raw = pty.and_then(|_| terminal::RawMode::enter());
    let outcome = started.and_then(|e| e.wait(&mut std::io::stdout(), &mut std::io::stderr()));
    drop(raw);
    let code = match outcome {
        Ok(Outcome::Exit(code)) => code.clamp(0, 255) as u8,
        Ok(Outcome::Killed(signal)) => (128 + signal).clamp(0, 255) as u8,
        Ok(Outcome::TimedOut) => 124,
        Err(ClientError::Refused { kind: agent_protocol::ErrorKind::NotFound, message }) => {
            eprintln!("ember: {message}");
            127
        }
        Err(ClientError::Refused { kind: agent_protocol::ErrorKind::CannotExecute, message }) => {
            eprintln!("ember: {message}");
            126
        }
        Err(e) => return fail(e.to_string()),
    };
    Ok(ExitCode::from(code))
}
