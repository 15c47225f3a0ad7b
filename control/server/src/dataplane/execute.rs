//! Starting a command, as the WebSocket's `execute` message and the SSE `start` body ask
//! (`langsmith/sandbox/_ws_execute.py`, `_sse_execute.py`): get-or-create by the client's
//! `command_id`, so that a client that lost its connection before `started` can send the same
//! request again without starting the command twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::commands::{pump, Command, Options};
use crate::backend::ExecSpec;
use crate::boxes::BoxRecord;
use crate::models::RunConfig;
use crate::state::{blocking, Shared};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExecuteRequest {
    pub command: String,
    pub command_id: Option<String>,
    pub timeout_seconds: Option<i64>,
    pub shell: Option<String>,
    pub idle_timeout_seconds: Option<i64>,
    #[serde(default)]
    pub kill_on_disconnect: bool,
    pub ttl_seconds: Option<i64>,
    pub env: Option<BTreeMap<String, String>>,
    pub cwd: Option<String>,
    pub run_config: Option<RunConfig>,
    #[serde(default)]
    pub close_stdin: bool,
    #[serde(default)]
    pub pty: bool,
}

/// Why a command did not start, with the `error_type` the SDK reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecError {
    pub kind: &'static str,
    pub message: String,
}

impl ExecError {
    fn new(kind: &'static str, message: impl Into<String>) -> ExecError {
        ExecError {
            kind,
            message: message.into(),
        }
    }
}

/// The SDK's seconds: absent is the default, a negative number is "never".
fn seconds(value: Option<i64>, default: Option<u64>) -> Option<Duration> {
    match value {
        Some(s) if s < 0 => None,
        Some(s) => Some(Duration::from_secs(s as u64)),
        None => default.map(Duration::from_secs),
    }
}

/// Whether `id` can name a command: what the SDK sends (32 hex digits of a UUIDv7) and the
/// like, never a path or a huge string.
fn plain_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl ExecuteRequest {
    /// What the backend runs for this request in `record`: the shell with the command, the
    /// box's run config with the request's layered over it.
    pub fn spec(&self, record: &BoxRecord) -> Result<ExecSpec, ExecError> {
        if self.run_config.is_some() && (self.env.is_some() || self.cwd.is_some()) {
            return Err(ExecError::new(
                "InvalidRequest",
                "run_config cannot be combined with the deprecated env and cwd",
            ));
        }
        let own = self.run_config.clone().unwrap_or(RunConfig {
            user: None,
            work_dir: self.cwd.clone(),
            env_vars: self.env.clone(),
        });
        let config = record.run_config.merged(&own);
        if let Some(dir) = config.work_dir.as_deref().filter(|d| !d.starts_with('/')) {
            return Err(ExecError::new(
                "InvalidRequest",
                format!("work_dir {dir:?} is not an absolute path"),
            ));
        }
        let shell = self.shell.clone().unwrap_or_else(|| "/bin/bash".into());
        Ok(ExecSpec {
            argv: vec![shell, "-c".into(), self.command.clone()],
            env: config.env_vars.unwrap_or_default().into_iter().collect(),
            cwd: config.work_dir,
            user: config.user,
            stdin: !self.close_stdin,
            pty: self.pty,
        })
    }

    pub fn options(&self) -> Options {
        Options {
            timeout: seconds(self.timeout_seconds, None).filter(|t| !t.is_zero()),
            idle_timeout: seconds(self.idle_timeout_seconds, Some(300)),
            kill_on_disconnect: self.kill_on_disconnect,
            ttl: seconds(self.ttl_seconds, Some(600)),
        }
    }
}

/// The command `request` names in `record` (a running box whose backend name is set), started
/// now unless its command id already runs there.
pub async fn get_or_start(
    state: &Shared,
    record: &BoxRecord,
    request: &ExecuteRequest,
) -> Result<Arc<Command>, ExecError> {
    let id = match request.command_id.as_deref() {
        Some(id) if plain_id(id) => id.to_string(),
        Some(id) => {
            return Err(ExecError::new(
                "InvalidRequest",
                format!("{id:?} is not a command id"),
            ))
        }
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let lock = state.commands.start_lock(&record.id, &id);
    let _starting = lock.lock().await;
    if let Some(command) = state.commands.get(&record.id, &id) {
        return Ok(command);
    }
    let spec = request.spec(record)?;
    let backend_name = record.backend.clone().ok_or_else(|| {
        ExecError::new("NotReady", format!("sandbox {} is not ready", record.name))
    })?;
    let backend = state.backend.clone();
    let exec_spec = spec.clone();
    let running = blocking(move || backend.exec(&backend_name, &exec_spec))
        .await
        .map_err(|e| ExecError::new("CommandError", e.to_string()))?
        .map_err(|e| ExecError::new("CommandError", e.to_string()))?;
    let command = state.commands.insert(
        &record.id,
        &id,
        running.as_ref(),
        spec.argv.clone(),
        spec.user.clone(),
        spec.cwd.clone(),
        request.options(),
        state.config.output_capacity,
        state.config.spill.as_ref().and_then(|(dir, capacity)| {
            super::spill::Spill::create(dir, *capacity)
                .map_err(|e| tracing::warn!("cannot make a spill file in {}: {e}; the command's output is held in memory only", dir.display()))
                .ok()
        }),
    );
    state.metrics.command_started();
    state.events.record(
        &record.id,
        serde_json::json!({"kind": "command", "phase": "start", "command_id": id, "argv": spec.argv, "user": spec.user, "cwd": spec.cwd, "pid": command.pid}),
    );
    pump(state.clone(), command.clone(), running);
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_runs_its_shell_with_the_boxes_config_under_its_own() {
        let mut record = BoxRecord::new("t", "b");
        record.run_config = RunConfig {
            user: Some("app".into()),
            work_dir: Some("/srv".into()),
            env_vars: Some([("A".to_string(), "1".to_string())].into()),
        };
        let request = ExecuteRequest {
            command: "echo $A".into(),
            env: Some([("B".to_string(), "2".to_string())].into()),
            close_stdin: true,
            ..Default::default()
        };
        let spec = request.spec(&record).unwrap();
        assert_eq!(spec.argv, ["/bin/bash", "-c", "echo $A"]);
        assert_eq!(
            spec.env,
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "2".to_string())
            ]
        );
        assert_eq!(
            (spec.cwd.as_deref(), spec.user.as_deref(), spec.stdin),
            (Some("/srv"), Some("app"), false)
        );
        let both = ExecuteRequest {
            run_config: Some(RunConfig::default()),
            cwd: Some("/x".into()),
            ..request.clone()
        };
        assert_eq!(both.spec(&record).unwrap_err().kind, "InvalidRequest");
        let relative = ExecuteRequest {
            cwd: Some("x".into()),
            ..request
        };
        assert_eq!(relative.spec(&record).unwrap_err().kind, "InvalidRequest");
    }

    #[test]
    fn seconds_default_and_negative_is_never() {
        let r = ExecuteRequest {
            timeout_seconds: Some(5),
            idle_timeout_seconds: Some(-1),
            ..Default::default()
        };
        let o = r.options();
        assert_eq!(
            (o.timeout, o.idle_timeout, o.ttl),
            (
                Some(Duration::from_secs(5)),
                None,
                Some(Duration::from_secs(600))
            )
        );
        let o = ExecuteRequest {
            timeout_seconds: Some(0),
            ttl_seconds: Some(-1),
            ..Default::default()
        }
        .options();
        assert_eq!(
            (o.timeout, o.idle_timeout, o.ttl),
            (None, Some(Duration::from_secs(300)), None)
        );
        assert!(plain_id("0190abcdef") && !plain_id("../x") && !plain_id(&"a".repeat(65)));
    }
}
