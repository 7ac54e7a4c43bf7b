//! CPU time from `/proc`: per thread of each benchmark process, the
//! client's own thread, and the host as a whole, so the report can say where
//! the cores went during a measurement window.

use std::collections::BTreeMap;

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on every
/// Linux ABI the project runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Host-wide `/proc/stat` ticks: (busy, softirq, total).
    host: (u64, u64, u64),
    /// Per watched process (by role), ticks per thread name.
    threads: Vec<(String, BTreeMap<String, u64>)>,
    /// This thread (the benchmark client), ticks.
    client: u64,
}

/// Takes a snapshot of the host, this thread and the processes `pids`
/// (role, pid). A process that has gone contributes nothing.
pub fn snapshot(pids: &[(&'static str, u32)]) -> Snapshot {
    Snapshot {
        host: host_ticks(),
        threads: pids
            .iter()
            .map(|(role, pid)| ((*role).to_string(), thread_ticks(*pid)))
            .collect(),
        client: std::fs::read_to_string("/proc/thread-self/stat")
            .ok()
            .and_then(|text| stat_ticks(&text))
            .map_or(0, |(_, ticks)| ticks),
    }
}

/// CPU use between two snapshots `seconds` apart, in cores (1.0 = one core
/// busy all the time): `client`, `ROLE/THREAD` for every thread that ran,
/// `ROLE` for each process in all, and `host.busy` / `host.softirq` as
/// fractions of all the host's cores.
pub fn usage(before: &Snapshot, after: &Snapshot, seconds: f64) -> BTreeMap<String, f64> {
    let mut cores = BTreeMap::new();
    let per = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / seconds.max(1e-9);
    cores.insert(
        "client".to_string(),
        per(after.client.saturating_sub(before.client)),
    );
    for (role, threads) in &after.threads {
        let earlier = before
            .threads
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, t)| t);
        let mut total = 0u64;
        for (name, ticks) in threads {
            let start = earlier.and_then(|t| t.get(name)).copied().unwrap_or(0);
            let used = ticks.saturating_sub(start);
            total += used;
            if used > 0 {
                cores.insert(format!("{role}/{name}"), per(used));
            }
        }
        cores.insert(role.clone(), per(total));
    }
    let (busy, softirq, total) = (
        after.host.0.saturating_sub(before.host.0),
        after.host.1.saturating_sub(before.host.1),
        after.host.2.saturating_sub(before.host.2).max(1),
    );
    cores.insert("host.busy".into(), busy as f64 / total as f64);
    cores.insert("host.softirq".into(), softirq as f64 / total as f64);
    cores
}

/// Ticks per thread of process `pid`, summed by thread name (the main
/// thread, which runs the vCPU, is called `vcpu`).
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut threads = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((name, ticks)) = stat_ticks(&text) else {
            continue;
        };
        let is_main = task.file_name().to_str() == Some(pid.to_string().as_str());
        let name = if is_main { "vcpu".to_string() } else { name };
        *threads.entry(name).or_insert(0) += ticks;
    }
    threads
}

/// (comm, utime + stime) of a `/proc/.../stat` line.
pub fn stat_ticks(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime and stime are
    // fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// Host-wide (busy, softirq, total) ticks from the first line of `/proc/stat`.
fn host_ticks() -> (u64, u64, u64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| text.lines().next().map(host_line))
        .unwrap_or((0, 0, 0))
}

/// Parses the `cpu  user nice system idle iowait irq softirq steal ...` line.
pub fn host_line(line: &str) -> (u64, u64, u64) {
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    let softirq = values.get(6).copied().unwrap_or(0);
    (total.saturating_sub(idle), softirq, total)
}

/// Host facts for the JSON report: (cores, kernel, CPU model, load average).
pub fn host_facts() -> (usize, String, String, String) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    (cores, kernel, model, load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_parsed_even_with_spaces_in_the_name() {
        let line = "4242 (tap-rx lsb) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 3 0";
        assert_eq!(stat_ticks(line), Some(("tap-rx lsb".to_string(), 267)));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn host_busy_excludes_idle_and_iowait() {
        let (busy, softirq, total) = host_line("cpu  100 0 50 800 10 5 20 0 0 0");
        assert_eq!((busy, softirq, total), (175, 20, 985));
    }

    #[test]
    fn usage_is_in_cores() {
        let before = Snapshot {
            host: (0, 0, 0),
            threads: vec![("vm".into(), BTreeMap::from([("vcpu".to_string(), 10)]))],
            client: 5,
        };
        let after = Snapshot {
            host: (150, 10, 200),
            threads: vec![("vm".into(), BTreeMap::from([("vcpu".to_string(), 110)]))],
            client: 55,
        };
        let cores = usage(&before, &after, 2.0);
        assert_eq!(cores["vm/vcpu"], 0.5);
        assert_eq!(cores["vm"], 0.5);
        assert_eq!(cores["client"], 0.25);
        assert_eq!(cores["host.busy"], 0.75);
    }
}
