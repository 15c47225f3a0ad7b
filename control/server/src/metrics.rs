//! `GET /metrics`: the server in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::boxes::Status;

/// Upper bounds of the create latency histogram's buckets, in seconds.
const CREATE_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Default)]
pub struct Metrics {
    create_buckets: [AtomicU64; CREATE_BUCKETS.len()],
    create_count: AtomicU64,
    create_micros: AtomicU64,
    commands: AtomicU64,
    file_operations: AtomicU64,
}

impl Metrics {
    /// A box became ready `took` after its create was asked for.
    pub fn created(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, count) in CREATE_BUCKETS.iter().zip(&self.create_buckets) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.create_count.fetch_add(1, Ordering::Relaxed);
        self.create_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn command_started(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }

    pub fn file_operation(&self) {
        self.file_operations.fetch_add(1, Ordering::Relaxed);
    }

    /// The text `/metrics` serves, with the boxes by status, the commands running now and the
    /// warm pools (name, sandboxes held, floor).
    pub fn render(
        &self,
        boxes: &[(Status, usize)],
        running_commands: usize,
        pools: &[(String, usize, usize)],
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP ember_sandboxes Sandboxes by status.\n# TYPE ember_sandboxes gauge\n");
        for (status, n) in boxes {
            let _ = writeln!(out, "ember_sandboxes{{status=\"{}\"}} {n}", status.as_str());
        }
        out.push_str("# HELP ember_sandbox_create_seconds Time from a create request to the sandbox being ready.\n");
        out.push_str("# TYPE ember_sandbox_create_seconds histogram\n");
        for (bound, count) in CREATE_BUCKETS.iter().zip(&self.create_buckets) {
            let _ = writeln!(
                out,
                "ember_sandbox_create_seconds_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.create_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "ember_sandbox_create_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.create_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "ember_sandbox_create_seconds_sum {sum}\nember_sandbox_create_seconds_count {count}"
        );
        out.push_str("# HELP ember_commands_started_total Commands started in sandboxes.\n# TYPE ember_commands_started_total counter\n");
        let _ = writeln!(
            out,
            "ember_commands_started_total {}",
            self.commands.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ember_commands_running Commands running now.\n# TYPE ember_commands_running gauge\n");
        let _ = writeln!(out, "ember_commands_running {running_commands}");
        out.push_str("# HELP ember_file_operations_total File operations on sandboxes.\n# TYPE ember_file_operations_total counter\n");
        let _ = writeln!(
            out,
            "ember_file_operations_total {}",
            self.file_operations.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ember_pool_sandboxes Ready sandboxes held by each warm pool.\n# TYPE ember_pool_sandboxes gauge\n");
        for (name, held, _) in pools {
            let _ = writeln!(out, "ember_pool_sandboxes{{pool=\"{name}\"}} {held}");
        }
        out.push_str("# HELP ember_pool_floor Sandboxes each warm pool is kept filled to.\n# TYPE ember_pool_floor gauge\n");
        for (name, _, floor) in pools {
            let _ = writeln!(out, "ember_pool_floor{{pool=\"{name}\"}} {floor}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_each_family_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.created(Duration::from_millis(80));
        m.created(Duration::from_secs(3));
        m.command_started();
        let text = m.render(
            &[(Status::Ready, 2), (Status::Stopped, 1)],
            1,
            &[("default".into(), 1, 2)],
        );
        for line in [
            "ember_sandboxes{status=\"ready\"} 2",
            "ember_sandboxes{status=\"stopped\"} 1",
            "ember_sandbox_create_seconds_bucket{le=\"0.05\"} 0",
            "ember_sandbox_create_seconds_bucket{le=\"0.1\"} 1",
            "ember_sandbox_create_seconds_bucket{le=\"5\"} 2",
            "ember_sandbox_create_seconds_bucket{le=\"+Inf\"} 2",
            "ember_sandbox_create_seconds_sum 3.08",
            "ember_sandbox_create_seconds_count 2",
            "ember_commands_started_total 1",
            "ember_commands_running 1",
            "ember_pool_sandboxes{pool=\"default\"} 1",
            "ember_pool_floor{pool=\"default\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
