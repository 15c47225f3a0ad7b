//! Counts that do not depend on CPU speed: VM exits by reason and device.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// VM exits to the VMM, keyed by (reason, device).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExitCounts(BTreeMap<(&'static str, &'static str), u64>);

impl ExitCounts {
    pub fn add(&mut self, reason: &'static str, device: &'static str) {
        *self.0.entry((reason, device)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &ExitCounts) {
        for (k, v) in &other.0 {
            *self.0.entry(*k).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, reason: &'static str, device: &'static str) -> u64 {
        self.0.get(&(reason, device)).copied().unwrap_or(0)
    }
}

/// The figures `ember run --stats` prints.
#[derive(Debug, Clone)]
pub struct RunStats {
    pub exits: ExitCounts,
    pub first_serial_byte: Option<Duration>,
    pub total: Duration,
}

impl RunStats {
    pub fn report(&self) -> String {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        let mut s = String::new();
        let first = self.first_serial_byte.map(ms).unwrap_or_else(|| "never".into());
        let _ = writeln!(s, "ember stats: start to first serial byte: {first}");
        let _ = writeln!(s, "ember stats: start to exit: {}", ms(self.total));
        let _ = writeln!(s, "ember stats: vm exits: {}", self.exits.total());
        for ((reason, device), n) in &self.exits.0 {
            let name = if device.is_empty() { reason.to_string() } else { format!("{reason} {device}") };
            let _ = writeln!(s, "ember stats:   {name:<24} {n}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_merge_and_report() {
        let mut a = ExitCounts::default();
        a.add("pio-write", "serial");
        a.add("pio-write", "serial");
        let mut b = ExitCounts::default();
        b.add("pio-write", "serial");
        b.add("shutdown", "");
        a.merge(&b);
        assert_eq!(a.total(), 4);
        assert_eq!(a.get("pio-write", "serial"), 3);
        let r = RunStats { exits: a, first_serial_byte: None, total: Duration::from_millis(1500) }.report();
        assert!(r.contains("start to first serial byte: never"), "{r}");
        assert!(r.contains("start to exit: 1500.0 ms"), "{r}");
        assert!(r.contains("vm exits: 4"), "{r}");
        assert!(r.contains("pio-write serial"), "{r}");
    }
}
