//! Each box's execution trace (`GET .../boxes/{name}/events`): one JSON object a line for every
//! command (argv, user, cwd, start, end, exit code, bytes out), file operation and lifecycle
//! step, in the order they happened. With a state directory the trace is a file per box,
//! `<dir>/<box id>.jsonl`, kept for the box's life; without, the last [`MEMORY_EVENTS`] of each
//! box are kept in memory.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::clock::{now_ms, rfc3339};

pub const MEMORY_EVENTS: usize = 10_000;

pub struct Events {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, VecDeque<String>>>,
}

impl Events {
    pub fn new(dir: Option<PathBuf>) -> Events {
        Events {
            dir,
            memory: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, box_id: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{box_id}.jsonl")))
    }

    /// Adds `event` (a JSON object) to box `box_id`'s trace, with the time as `at`.
    pub fn record(&self, box_id: &str, mut event: serde_json::Value) {
        if let Some(object) = event.as_object_mut() {
            object.insert("at".into(), rfc3339(now_ms()).into());
        }
        let line = event.to_string();
        match self.file(box_id) {
            Some(path) => {
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
                if let Err(e) = written {
                    tracing::warn!("cannot write the event trace {}: {e}", path.display());
                }
            }
            None => {
                let mut memory = self.memory.lock().unwrap();
                let events = memory.entry(box_id.to_string()).or_default();
                if events.len() == MEMORY_EVENTS {
                    events.pop_front();
                }
                events.push_back(line);
            }
        }
    }

    /// Box `box_id`'s trace as JSON lines.
    pub fn read(&self, box_id: &str) -> String {
        match self.file(box_id) {
            Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
            None => {
                let memory = self.memory.lock().unwrap();
                memory
                    .get(box_id)
                    .map(|e| e.iter().map(|l| format!("{l}\n")).collect())
                    .unwrap_or_default()
            }
        }
    }

    /// Drops a deleted box's trace.
    pub fn forget(&self, box_id: &str) {
        match self.file(box_id) {
            Some(path) => {
                let _ = std::fs::remove_file(path);
            }
            None => {
                self.memory.lock().unwrap().remove(box_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn traces_are_json_lines_per_box_in_order_in_memory_and_on_disk() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-events-").unwrap();
        for events in [
            Events::new(None),
            Events::new(Some(tmp.as_path().to_path_buf())),
        ] {
            events.record(
                "a",
                serde_json::json!({"kind": "lifecycle", "op": "create"}),
            );
            events.record("b", serde_json::json!({"kind": "file"}));
            events.record(
                "a",
                serde_json::json!({"kind": "command", "argv": ["true"]}),
            );
            assert_eq!(kinds(&events.read("a")), ["lifecycle", "command"]);
            let first: serde_json::Value =
                serde_json::from_str(events.read("a").lines().next().unwrap()).unwrap();
            assert!(first["at"].as_str().unwrap().ends_with('Z'));
            events.forget("a");
            assert_eq!(events.read("a"), "");
            assert_eq!(kinds(&events.read("b")), ["file"]);
        }
    }

    #[test]
    fn memory_keeps_the_newest_events_of_a_box() {
        let events = Events::new(None);
        for i in 0..MEMORY_EVENTS + 2 {
            events.record("a", serde_json::json!({"kind": "file", "n": i}));
        }
        let text = events.read("a");
        assert_eq!(text.lines().count(), MEMORY_EVENTS);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["n"], 2);
    }
}
