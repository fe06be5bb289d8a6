//! The standard `process_*` metrics that Prometheus client libraries export
//! (CPU, memory, file descriptors, start time), read from Linux's `/proc`,
//! and `inletd_build_info`. Dashboards and alerts written for any
//! Prometheus target work on inletd unchanged.
//!
//! Each figure that cannot be read (another OS, a `/proc` without the
//! field) is left out rather than reported as 0.

use std::fmt::Write as _;

/// Clock ticks per second in `/proc/*/stat`: USER_HZ, fixed at 100 in
/// Linux's user-space ABI whatever the kernel's own tick rate.
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc` says of this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessFigures {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    /// Reads this process's figures.
    pub fn read() -> ProcessFigures {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| field_after(&s, "btime"));
        ProcessFigures {
            cpu_seconds: fields
                .as_ref()
                .map(|f| (f.utime + f.stime) as f64 / TICKS_PER_SECOND),
            resident_bytes: field_after(&status, "VmRSS:").map(|kib| kib * 1024),
            virtual_bytes: field_after(&status, "VmSize:").map(|kib| kib * 1024),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| field_after(&s, "Max open files")),
            start_time_seconds: fields
                .zip(boot_time)
                .map(|(f, boot)| boot as f64 + f.start_ticks as f64 / TICKS_PER_SECOND),
        }
    }

    /// Appends the figures in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let metrics = [
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                self.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                self.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                self.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                self.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                self.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                self.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in metrics {
            if let Some(value) = value {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
                );
            }
        }
    }
}

/// Appends `inletd_build_info`: the version (and storage format) as labels
/// of a gauge that is always 1, the Prometheus way to expose a build.
pub fn render_build_info(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP inletd_build_info The running build: its version and storage format.\n\
         # TYPE inletd_build_info gauge\n\
         inletd_build_info{{version=\"{}\",storage_format=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::storage::FORMAT_VERSION
    );
}

/// The fields of `/proc/self/stat` this module reads.
struct StatFields {
    utime: u64,
    stime: u64,
    start_ticks: u64,
}

/// Reads `/proc/self/stat`: the command name (field 2) is in parentheses
/// and may hold spaces, so fields are counted from its closing one.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is at N - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
    })
}

/// The first number after `label` on the line that starts with it
/// (`VmRSS:   1234 kB`, `btime 1700000000`, `Max open files  1024  4096 files`).
fn field_after(text: &str, label: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(label))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_past_a_command_name_with_spaces() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 3 0 123456 1000000 500 18446744073709551615";
        let f = stat_fields(stat).unwrap();
        assert_eq!((f.utime, f.stime, f.start_ticks), (250, 75, 123456));
        assert!(stat_fields("4242 (cut").is_none());
    }

    #[test]
    fn labelled_numbers_are_read_from_their_line() {
        let status = "Name:\tinletd\nVmSize:\t  123456 kB\nVmRSS:\t    9876 kB\n";
        assert_eq!(field_after(status, "VmRSS:"), Some(9876));
        assert_eq!(field_after(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(field_after(limits, "Max open files"), Some(1024));
    }

    #[test]
    fn this_process_has_figures_and_they_render() {
        let f = ProcessFigures::read();
        assert!(f.resident_bytes.unwrap() > 1 << 20, "{f:?}");
        assert!(f.open_fds.unwrap() >= 3, "{f:?}");
        assert!(f.max_fds.unwrap() >= f.open_fds.unwrap(), "{f:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = f.start_time_seconds.unwrap();
        assert!(started <= now + 1.0 && started > now - 86_400.0, "{f:?}");
        let mut out = String::new();
        f.render(&mut out);
        render_build_info(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "inletd_build_info{version=",
        ] {
            assert!(out.contains(name), "{name} missing:\n{out}");
        }
    }
}
