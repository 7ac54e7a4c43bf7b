//! Rows, the printed tables, the measured breakdown and the JSON rows.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::scenario::{
    Config, Direction, GOAL_CPU_PER_GBIT, GOAL_LOG_PER_CLIENT_BYTE, Scenario, Variant, paper,
    rate_name,
};
use super::stats::{Cells, Measured, Spread};

/// One row of results: a direction with FT on in one variant, against FT
/// off in the same rounds of the same scenario.
#[derive(Clone, Debug)]
pub struct Row {
    /// The gate key (`receive.tcp-1g`).
    pub key: String,
    /// The scenario's name.
    pub scenario: &'static str,
    /// receive or transmit.
    pub direction: Direction,
    /// How FT on carried its log.
    pub variant: Variant,
    /// The client link, Mbit/s each way (`None`: unshaped).
    pub client_link_mbit: Option<u32>,
    /// FT off, Mbit/s.
    pub base: Spread,
    /// FT on, Mbit/s.
    pub ft: Spread,
    /// FT on / FT off, paired within each round.
    pub ratio: Spread,
    /// Logging channel bandwidth during FT on, Mbit/s.
    pub logging: Spread,
    /// Log bytes per client byte during FT on.
    pub log_per_client_byte: Spread,
    /// Output hold time during FT on, µs (medians of p50, p99, p99.9).
    pub hold_us: (f64, f64, f64),
    /// Ack round trip during FT on, µs (medians of p50, p99).
    pub ack_rtt_us: (f64, f64),
    /// The backup's lag: (most exits behind, entry wait p50 µs, p99 µs).
    pub lag: (f64, f64, f64),
    /// The primary host's core-seconds per Gbit: (FT off, FT on), medians.
    pub primary_cpu_per_gbit: (f64, f64),
    /// FT on / FT off of the primary host's CPU per Gbit, paired per round.
    pub cpu_ratio: Spread,
    /// The backup host's core-seconds per Gbit (FT on), median.
    pub backup_cpu_per_gbit: f64,
    /// CPU of other work on the host during the row's runs (FT off and
    /// FT on), cores, median: how shared the host was.
    pub outside_cores: f64,
    /// Why FT-on runs failed, if any did.
    pub failures: Vec<String>,
    /// Why FT-off runs of the row's scenario failed, if any did.
    pub base_failures: Vec<String>,
}

impl Row {
    /// The median FT/base ratio, if FT on produced any figure.
    pub fn ratio(&self) -> Option<f64> {
        (self.ratio.n > 0).then_some(self.ratio.median)
    }

    /// The paper's FT-on figure for this row's logging link, if it has one.
    pub fn paper_ft(&self) -> Option<(f64, f64)> {
        let p = paper(self.direction);
        match (self.client_link_mbit, self.variant.log_mbit) {
            (Some(1000), Some(1000)) => Some((p.ft_on_1g, p.log_1g)),
            (Some(1000), Some(10_000)) => Some((p.ft_on_10g, p.log_10g)),
            _ => None,
        }
    }

    /// The row's JSON (the keys the issue lists, then the spreads and the rest).
    pub fn to_json(&self) -> Value {
        let number = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        let paper_ft = self.paper_ft();
        let paper_row = paper(self.direction);
        json!({
            "key": self.key,
            "scenario": self.scenario,
            "direction": self.direction.name(),
            "transport": self.variant.transport.name(),
            "client_link_mbit": self.client_link_mbit,
            "log_link_mbit": self.variant.log_mbit,
            "ft_off_mbit": number(self.base.median),
            "ft_on_mbit": number(self.ft.median),
            "ratio": number(self.ratio.median),
            "log_mbit": number(self.logging.median),
            "log_bytes_per_client_byte": number(self.log_per_client_byte.median),
            "held_p50_us": number(self.hold_us.0),
            "held_p99_us": number(self.hold_us.1),
            "held_p999_us": number(self.hold_us.2),
            "goal_ratio": self.variant.goal(),
            "paper": paper_ft.map(|(ft, log)| json!({
                "ft_off_mbit": paper_row.ft_off,
                "ft_on_mbit": ft,
                "ratio": ft / paper_row.ft_off,
                "log_mbit": log,
                "log_bytes_per_client_byte": log / ft,
            })),
            "ack_rtt_p50_us": number(self.ack_rtt_us.0),
            "ack_rtt_p99_us": number(self.ack_rtt_us.1),
            "backup_lag_max_exits": number(self.lag.0),
            "backup_wait_p50_us": number(self.lag.1),
            "backup_wait_p99_us": number(self.lag.2),
            "primary_cpu_s_per_gbit_ft_off": number(self.primary_cpu_per_gbit.0),
            "primary_cpu_s_per_gbit_ft_on": number(self.primary_cpu_per_gbit.1),
            "primary_cpu_ratio": number(self.cpu_ratio.median),
            "backup_cpu_s_per_gbit": number(self.backup_cpu_per_gbit),
            "spread": {
                "ft_off_mbit": self.base.to_json(),
                "ft_on_mbit": self.ft.to_json(),
                "ratio": self.ratio.to_json(),
                "log_mbit": self.logging.to_json(),
                "log_bytes_per_client_byte": self.log_per_client_byte.to_json(),
                "primary_cpu_ratio": self.cpu_ratio.to_json(),
            },
            "other_work_cores": number(self.outside_cores),
            "failures": self.failures,
            "ft_off_failures": self.base_failures,
        })
    }
}

/// The rows of every scenario, in table order (direction, then scenario).
pub fn rows(scenarios: &[Scenario], cells: &Cells, cores: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    for direction in Direction::ALL {
        for (index, scenario) in scenarios.iter().enumerate() {
            for &variant in &scenario.variants {
                let ft = Config::FtOn(variant);
                let on = |f: &dyn Fn(&Measured) -> f64| cells.values(index, ft, direction, f);
                let off =
                    |f: &dyn Fn(&Measured) -> f64| cells.values(index, Config::FtOff, direction, f);
                rows.push(Row {
                    key: scenario.key(direction, variant),
                    scenario: scenario.name,
                    direction,
                    variant,
                    client_link_mbit: scenario.client_mbit,
                    base: off(&|m| m.mbit_s),
                    ft: on(&|m| m.mbit_s),
                    ratio: cells.paired(index, variant, direction, |m| m.mbit_s),
                    logging: on(&|m| m.log_mbit_s()),
                    log_per_client_byte: on(&|m| m.log_per_client_byte()),
                    hold_us: (
                        on(&|m| m.hold_at(0.5)).median,
                        on(&|m| m.hold_at(0.99)).median,
                        on(&|m| m.hold_at(0.999)).median,
                    ),
                    ack_rtt_us: (
                        on(&|m| m.ack_rtt_p50_us).median,
                        on(&|m| m.ack_rtt_p99_us).median,
                    ),
                    lag: (
                        on(&|m| m.lag_max_exits).median,
                        on(&|m| m.lag_wait_p50_us).median,
                        on(&|m| m.lag_wait_p99_us).median,
                    ),
                    primary_cpu_per_gbit: (
                        off(&|m| m.primary_cpu_per_gbit()).median,
                        on(&|m| m.primary_cpu_per_gbit()).median,
                    ),
                    cpu_ratio: cells
                        .paired(index, variant, direction, |m| m.primary_cpu_per_gbit()),
                    backup_cpu_per_gbit: on(&|m| m.backup_cpu_per_gbit()).median,
                    outside_cores: Spread::of(
                        &cells
                            .ok(index, ft, direction)
                            .chain(cells.ok(index, Config::FtOff, direction))
                            .map(|m| outside(m, cores))
                            .collect::<Vec<_>>(),
                    )
                    .median,
                    failures: cells.failures(index, ft, direction),
                    base_failures: cells.failures(index, Config::FtOff, direction),
                });
            }
        }
    }
    rows
}

fn link_name(mbit: Option<u32>) -> String {
    mbit.map_or_else(|| "unshaped".into(), rate_name)
}

fn or_dash(value: f64, precision: usize) -> String {
    if value.is_finite() {
        format!("{value:.precision$}")
    } else {
        "-".into()
    }
}

/// The tables: bandwidth with the paper's figures beside ours, then the
/// held output, ack round trip and lag, then CPU per Gbit.
pub fn tables(rows: &[Row], heading: &str, rdma: &str) -> String {
    let mut text = format!("{heading}\n\n");
    let _ = writeln!(
        text,
        "{:<9} {:<8} {:<7} | {:>6} {:>6} {:>5} {:>5} | {:>17} {:>17} {:>21} {:>5} | {:>15} {:>7}",
        "test",
        "client",
        "log",
        "paper",
        "paper",
        "paper",
        "paper",
        "FT off",
        "FT on",
        "FT/base",
        "goal",
        "logging",
        "log B /"
    );
    let _ = writeln!(
        text,
        "{:<9} {:<8} {:<7} | {:>6} {:>6} {:>5} {:>5} | {:>17} {:>17} {:>21} {:>5} | {:>15} {:>7}",
        "",
        "link",
        "link",
        "FT off",
        "FT on",
        "ratio",
        "log",
        "",
        "",
        "paired per round",
        "",
        "Mbit/s",
        "client B"
    );
    for row in rows {
        let paper_row = paper(row.direction);
        let (p_off, p_ft, p_ratio, p_log) = match row.paper_ft() {
            Some((ft, log)) => (
                format!("{:.0}", paper_row.ft_off),
                format!("{ft:.0}"),
                format!("{:.3}", ft / paper_row.ft_off),
                format!("{log:.0}"),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let ft = if row.ft.n == 0 {
            format!("FAILED x{}", row.failures.len())
        } else {
            row.ft.text(0)
        };
        let _ = writeln!(
            text,
            "{:<9} {:<8} {:<7} | {:>6} {:>6} {:>5} {:>5} | {:>17} {:>17} {:>21} {:>5} | {:>15} {:>7}",
            row.direction.name(),
            link_name(row.client_link_mbit),
            row.variant.name(),
            p_off,
            p_ft,
            p_ratio,
            p_log,
            row.base.text(0),
            ft,
            row.ratio.text(3),
            format!("{:.2}", row.variant.goal()),
            row.logging.text(0),
            or_dash(row.log_per_client_byte.median, 3),
        );
    }
    for direction in Direction::ALL {
        let _ = writeln!(
            text,
            "{:<9} {:<8} {:<7} | {:>27} | {rdma}",
            direction.name(),
            "",
            "rdma",
            ""
        );
    }
    let _ = writeln!(
        text,
        "\npaper's log B per client B: receive 1.21 (1G) / 1.15 (10G), transmit 0.05 / 0.06; goal for receive: <= {GOAL_LOG_PER_CLIENT_BYTE}\n"
    );
    let _ = writeln!(
        text,
        "{:<9} {:<8} {:<7} | {:>28} | {:>19} | {:>31}",
        "FT on",
        "client",
        "log",
        "held output p50/p99/p99.9 µs",
        "ack RTT p50/p99 µs",
        "backup lag: exits, wait p50/p99"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:<9} {:<8} {:<7} | {:>28} | {:>19} | {:>31}",
            row.direction.name(),
            link_name(row.client_link_mbit),
            row.variant.name(),
            format!(
                "{} / {} / {}",
                or_dash(row.hold_us.0, 0),
                or_dash(row.hold_us.1, 0),
                or_dash(row.hold_us.2, 0)
            ),
            format!(
                "{} / {}",
                or_dash(row.ack_rtt_us.0, 0),
                or_dash(row.ack_rtt_us.1, 0)
            ),
            format!(
                "<= {}, {} / {} µs",
                or_dash(row.lag.0, 0),
                or_dash(row.lag.1, 0),
                or_dash(row.lag.2, 0)
            ),
        );
    }
    let _ = writeln!(
        text,
        "\n{:<9} {:<8} {:<7} | {:>38} | {:>18}",
        "CPU", "client", "log", "primary host core-s per Gbit: off / on", "backup host per Gbit"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:<9} {:<8} {:<7} | {:>38} | {:>18}",
            row.direction.name(),
            link_name(row.client_link_mbit),
            row.variant.name(),
            format!(
                "{} / {} = {} (goal <= {GOAL_CPU_PER_GBIT})",
                or_dash(row.primary_cpu_per_gbit.0, 2),
                or_dash(row.primary_cpu_per_gbit.1, 2),
                if row.cpu_ratio.n == 0 {
                    "-".into()
                } else {
                    format!("{:.2}", row.cpu_ratio.median)
                }
            ),
            or_dash(row.backup_cpu_per_gbit, 2),
        );
    }
    for row in rows.iter().filter(|r| !r.failures.is_empty()) {
        let _ = writeln!(
            text,
            "\n{}: {} of {} FT-on runs failed; first: {}",
            row.key,
            row.failures.len(),
            row.failures.len() + row.ft.n,
            row.failures.first().map_or("", String::as_str)
        );
    }
    text
}

/// CPU cores of `name` (`ROLE` or `ROLE/THREAD`): 0 for a thread that did
/// not run in a process that did, NaN where there is no such process.
fn cpu_of(m: &Measured, name: &str) -> f64 {
    let role = name.split('/').next().unwrap_or(name);
    match (m.cpu.get(name), m.cpu.contains_key(role)) {
        (Some(cores), _) => *cores,
        (None, true) => 0.0,
        (None, false) => f64::NAN,
    }
}

/// CPU cores used by the benchmark's processes and the client.
fn total_cpu(m: &Measured) -> f64 {
    ["vm", "primary", "backup", "client"]
        .iter()
        .filter_map(|k| m.cpu.get(*k))
        .sum()
}

/// Host CPU (cores) not used by the benchmark's processes or its client:
/// other work on a shared host, plus kernel work not charged to a process.
fn outside(m: &Measured, cores: usize) -> f64 {
    let busy = m.cpu.get("host.busy").copied().unwrap_or(f64::NAN) * cores as f64;
    (busy - total_cpu(m)).max(0.0)
}

/// The measured breakdown: where the time goes, per scenario, direction
/// and configuration (medians over the rounds).
pub fn breakdown(scenarios: &[Scenario], cells: &Cells, cores: usize) -> String {
    let mut text = String::from(
        "\nWhere the time goes (medians over the rounds; CPU in cores = CPU seconds per second of the window):\n",
    );
    for (index, scenario) in scenarios.iter().enumerate() {
        let configs = scenario.configs();
        for direction in Direction::ALL {
            let _ = write!(
                text,
                "\n{:<34}",
                format!(
                    "{} ({}, client link {})",
                    direction.name(),
                    scenario.name,
                    link_name(scenario.client_mbit)
                )
            );
            for config in &configs {
                let _ = write!(text, " {:>14}", config.label());
            }
            text.push('\n');
            let line =
                |text: &mut String, name: &str, f: &dyn Fn(&Measured) -> f64, precision: usize| {
                    let figures: Vec<Spread> = configs
                        .iter()
                        .map(|&c| cells.values(index, c, direction, f))
                        .collect();
                    if figures.iter().all(|s| s.n == 0) {
                        return;
                    }
                    let _ = write!(text, "  {name:<32}");
                    for spread in figures {
                        if spread.n == 0 {
                            let _ = write!(text, " {:>14}", "-");
                        } else {
                            let _ = write!(text, " {:>14.p$}", spread.median, p = precision);
                        }
                    }
                    text.push('\n');
                };
            // Exit counts and log bytes cover the whole process life, which
            // beyond the active traffic is an idle start of a few dozen exits.
            line(&mut text, "guest Mbit/s", &|m| m.mbit_s, 0);
            line(&mut text, "exits/s", &|m| m.exits / m.active_s, 0);
            line(
                &mut text,
                "client bytes per exit",
                &|m| m.client_bytes / m.exits,
                0,
            );
            line(&mut text, "log entries/s", &|m| m.entries / m.active_s, 0);
            line(
                &mut text,
                "log bytes per exit",
                &|m| m.log_bytes / m.exits,
                1,
            );
            line(&mut text, "logging Mbit/s", &|m| m.log_mbit_s(), 0);
            line(
                &mut text,
                "log bytes per client byte",
                &|m| m.log_per_client_byte(),
                3,
            );
            line(
                &mut text,
                "entries per batch",
                &|m| m.entries / m.batches,
                1,
            );
            line(&mut text, "ack round trip p50 µs", &|m| m.ack_rtt_p50_us, 0);
            line(&mut text, "ack round trip p99 µs", &|m| m.ack_rtt_p99_us, 0);
            line(&mut text, "held output p50 µs", &|m| m.hold_at(0.5), 0);
            line(&mut text, "held output p99 µs", &|m| m.hold_at(0.99), 0);
            line(&mut text, "frames held at most", &|m| m.max_held, 0);
            line(&mut text, "ring-full stalls", &|m| m.ring_stalls, 0);
            line(
                &mut text,
                "backup lag, exits (max)",
                &|m| m.lag_max_exits,
                0,
            );
            line(
                &mut text,
                "backup entry wait p50 µs",
                &|m| m.lag_wait_p50_us,
                0,
            );
            line(
                &mut text,
                "primary host core-s per Gbit",
                &|m| m.primary_cpu_per_gbit(),
                2,
            );
            line(
                &mut text,
                "backup host core-s per Gbit",
                &|m| m.backup_cpu_per_gbit(),
                2,
            );
            // CPU per thread: every name seen in any configuration.
            let mut names: Vec<String> = configs
                .iter()
                .flat_map(|&c| {
                    cells
                        .ok(index, c, direction)
                        .flat_map(|m| m.cpu.keys().cloned())
                })
                .filter(|name| !name.starts_with("host."))
                .collect();
            names.sort();
            names.dedup();
            // Processes first, then their threads (`role/thread` sorts after `role`).
            for name in &names {
                let label = if name.contains('/') {
                    format!("  cpu {name}")
                } else {
                    format!("cpu {name}")
                };
                line(&mut text, &label, &|m| cpu_of(m, name), 2);
            }
            line(
                &mut text,
                &format!("host busy, cores of {cores}"),
                &|m| m.cpu.get("host.busy").copied().unwrap_or(f64::NAN) * cores as f64,
                2,
            );
            line(
                &mut text,
                "  of which outside the benchmark",
                &|m| outside(m, cores),
                2,
            );
            line(
                &mut text,
                "  of which softirq",
                &|m| m.cpu.get("host.softirq").copied().unwrap_or(f64::NAN) * cores as f64,
                2,
            );
        }
    }
    text
}

/// Sentences from the measured figures, per row: the verdict against the
/// goal, and where the time and the bytes went.
pub fn findings(rows: &[Row], cells: &Cells, scenarios: &[Scenario], cores: usize) -> String {
    let mut text = String::from("\nFindings:\n");
    for row in rows {
        let Some(index) = scenarios.iter().position(|s| s.name == row.scenario) else {
            continue;
        };
        let Some(ratio) = row.ratio() else {
            let _ = writeln!(
                text,
                "- {}: no FT-on figure: {}",
                row.key,
                row.failures.first().map_or("no runs", String::as_str)
            );
            continue;
        };
        let ft = Config::FtOn(row.variant);
        let on = |f: &dyn Fn(&Measured) -> f64| cells.values(index, ft, row.direction, f).median;
        let off = |f: &dyn Fn(&Measured) -> f64| {
            cells.values(index, Config::FtOff, row.direction, f).median
        };
        let busy = |m: &Measured| m.cpu.get("host.busy").copied().unwrap_or(f64::NAN);
        let filled = row
            .client_link_mbit
            .is_none_or(|link| row.base.median >= 0.85 * f64::from(link));
        let verdict = match (filled, ratio >= row.variant.goal()) {
            (false, _) => "not judged against the goal, since FT off did not fill the link",
            (true, true) => "meets the goal",
            (true, false) => "short of the goal",
        };
        let _ = writeln!(
            text,
            "- {}: FT/base {ratio:.3} [{:.3}..{:.3}] ({verdict} {:.2}; {:.0} vs {:.0} Mbit/s). Log {:.0} Mbit/s, {:.3} log bytes per client byte. \
             Held output p50 {:.0} µs (ack RTT p50 {:.0} µs). Host busy {:.2} of {cores} cores vs {:.2} FT off; primary host {:.2} core-s per Gbit vs {:.2} FT off; backup host {:.2}.",
            row.key,
            row.ratio.min,
            row.ratio.max,
            row.variant.goal(),
            row.ft.median,
            row.base.median,
            row.logging.median,
            row.log_per_client_byte.median,
            row.hold_us.0,
            row.ack_rtt_us.0,
            on(&busy) * cores as f64,
            off(&busy) * cores as f64,
            row.primary_cpu_per_gbit.1,
            row.primary_cpu_per_gbit.0,
            row.backup_cpu_per_gbit,
        );
        if on(&busy) >= 0.9 && (ratio < row.variant.goal() || !filled) {
            let _ = writeln!(
                text,
                "  The host's cores were saturated during FT on ({:.2} cores outside the benchmark): bandwidth is bounded by CPU here, and the backup's replay and the sender thread come out of the guest's share.",
                on(&|m| outside(m, cores))
            );
        }
        if !filled {
            let _ = writeln!(
                text,
                "  FT off itself reached only {:.0} Mbit/s of the {} client link: the host is too loaded to fill it, and the CPU the benchmark gets follows its runnable threads (FT on has more) more than its work.",
                row.base.median,
                link_name(row.client_link_mbit)
            );
        }
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A row with one round of figures, for the gate's tests.
    pub(crate) fn row(direction: &str, variant: &str, base: f64, ft: f64) -> Row {
        let one = |v: f64| Spread::of(&[v]);
        let parsed = match variant {
            "shm" => Variant::shm(),
            "tcp-10g" => Variant::tcp(Some(10_000)),
            "unshaped-tcp" | "tcp" => Variant::tcp(None),
            _ => Variant::tcp(Some(1000)),
        };
        Row {
            key: format!("{direction}.{variant}"),
            scenario: if variant.starts_with("unshaped") {
                "unshaped"
            } else {
                "paper"
            },
            direction: Direction::from_name(direction).unwrap_or(Direction::Receive),
            variant: parsed,
            client_link_mbit: Some(1000),
            base: one(base),
            ft: one(ft),
            ratio: one(ft / base),
            logging: one(0.0),
            log_per_client_byte: one(1.0),
            hold_us: (0.0, 0.0, 0.0),
            ack_rtt_us: (0.0, 0.0),
            lag: (0.0, 0.0, 0.0),
            primary_cpu_per_gbit: (1.0, 1.0),
            cpu_ratio: one(1.0),
            backup_cpu_per_gbit: 0.5,
            outside_cores: 0.0,
            failures: Vec::new(),
            base_failures: Vec::new(),
        }
    }

    #[test]
    fn json_rows_carry_the_issue_keys() {
        let json = row("receive", "tcp-1g", 940.0, 930.0).to_json();
        for key in [
            "direction",
            "transport",
            "client_link_mbit",
            "log_link_mbit",
            "ft_off_mbit",
            "ft_on_mbit",
            "ratio",
            "log_mbit",
            "log_bytes_per_client_byte",
            "held_p50_us",
            "held_p99_us",
        ] {
            assert!(json.get(key).is_some(), "no {key} in {json}");
        }
        assert_eq!(json["direction"], "receive");
        assert_eq!(json["transport"], "tcp");
        assert_eq!(json["log_link_mbit"], 1000);
        assert_eq!(json["paper"]["ft_on_mbit"], 604.0);
        let unshaped = row("transmit", "unshaped-tcp", 3000.0, 1500.0).to_json();
        assert_eq!(unshaped["log_link_mbit"], Value::Null);
        assert_eq!(unshaped["paper"], Value::Null);
    }

    #[test]
    fn tables_put_the_paper_beside_ours() {
        let rows = [
            row("receive", "tcp-1g", 940.0, 930.0),
            row("receive", "tcp-10g", 940.0, 938.0),
            row("transmit", "shm", 940.0, 935.0),
        ];
        let text = tables(&rows, "Table 2", "not available");
        let line = text
            .lines()
            .find(|l| l.contains("tcp-1g") && l.contains('|') && l.contains("604"))
            .expect("the receive tcp-1g row with the paper's 604");
        assert!(line.contains("0.643"), "{line}");
        assert!(line.contains("0.989"), "{line}");
        assert!(text.contains("860"), "{text}");
    }
}
