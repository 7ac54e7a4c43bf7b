//! `lockstep testbed …` and `lockstep client`: the emulated hosts by hand.
//!
//! ```text
//!  lockstep testbed up      → Testbed::up("manual").keep()   (stays after exit)
//!  lockstep testbed down R  → Testbed::down(R)  (--all: every one; stale ones first)
//!  lockstep testbed status  → each record: alive → Testbed::status(), else STALE
//!  lockstep testbed cut|restore|shape LINK [--run R]
//!  lockstep client [--run R] -- CMD…  → CMD in the client namespace,
//!                                        $LOCKSTEP_GUEST = the guest's address
//! ```

use clap::Subcommand;

use crate::{Ns, Testbed, TestbedError};

/// `lockstep testbed …`.
#[derive(Subcommand)]
pub enum Action {
    /// Build a testbed that stays until `lockstep testbed down`.
    Up {
        /// Both hosts' client links: a rate (`1gbit`, `100mbit`) or `unshaped`.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        client_link: crate::Rate,
        /// The logging link.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        log_link: crate::Rate,
        /// Both management links.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        mgmt_link: crate::Rate,
    },
    /// Remove testbed RUN (and what runs in it), or every one with --all.
    Down {
        /// The run id (`lockstep testbed status` lists them).
        run: Option<String>,
        /// Remove every testbed on this host.
        #[arg(long)]
        all: bool,
    },
    /// List the testbeds on this host with their links, rates and the
    /// switch port the guest was learnt on.
    Status {
        /// Only this run.
        run: Option<String>,
    },
    /// Cut a link (both ends down): `log`, `client-a`, `client-b`, `mgmt-a`, `mgmt-b`.
    Cut {
        /// The link.
        #[arg(value_parser = parse_link)]
        link: crate::Link,
        /// The testbed (default: the only one).
        #[arg(long)]
        run: Option<String>,
    },
    /// Restore a cut link.
    Restore {
        /// The link.
        #[arg(value_parser = parse_link)]
        link: crate::Link,
        /// The testbed (default: the only one).
        #[arg(long)]
        run: Option<String>,
    },
    /// Shape a link to RATE in both directions (`unshaped` removes it).
    Shape {
        /// The link.
        #[arg(value_parser = parse_link)]
        link: crate::Link,
        /// The rate.
        #[arg(value_parser = parse_rate)]
        rate: crate::Rate,
        /// The testbed (default: the only one).
        #[arg(long)]
        run: Option<String>,
    },
}

/// A `--…-link` rate: `1gbit`, `100mbit`, `unshaped`.
pub fn parse_rate(text: &str) -> Result<crate::Rate, String> {
    crate::Rate::parse(text)
        .ok_or_else(|| format!("`{text}` is not a rate (say 1gbit, 100mbit or unshaped)"))
}

/// A link by name (`log`, `client-a`, …).
pub fn parse_link(text: &str) -> Result<crate::Link, String> {
    crate::Link::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = crate::Link::ALL.iter().map(|l| l.name()).collect();
        format!("`{text}` is not a link (one of {})", names.join(", "))
    })
}

/// The testbed `run`, or the one `lockstep up` runs (`label`), or the only
/// one on this host.
pub fn pick(run: Option<&str>, label: Option<&str>) -> Result<Testbed, TestbedError> {
    if let Some(run) = run {
        return Testbed::attach(run);
    }
    let candidates: Vec<crate::Record> = match label {
        Some(label) => Testbed::find(label)?,
        None => Testbed::list()?
            .into_iter()
            .filter(|(_, alive)| *alive)
            .map(|(record, _)| record)
            .collect(),
    };
    let what = label.map_or("testbed".to_string(), |l| format!("`lockstep {l}`"));
    match candidates.as_slice() {
        [one] => Testbed::attach(&one.run),
        [] => Err(TestbedError::Choice(format!(
            "no {what} is running on this host (pass --run ID; `lockstep testbed status` lists testbeds)"
        ))),
        many => Err(TestbedError::Choice(format!(
            "{} of {what} are running (runs {}): pass --run ID",
            many.len(),
            many.iter()
                .map(|r| r.run.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `lockstep client -- CMD…`: runs CMD in the deployment's client namespace;
/// returns its exit code (the caller exits with it).
pub fn client(run: Option<&str>, command: &[String]) -> Result<i32, TestbedError> {
    let bed = pick(run, if run.is_some() { None } else { Some("up") })?;
    let Some((program, args)) = command.split_first() else {
        return Err(TestbedError::Choice(
            "lockstep client needs a command".into(),
        ));
    };
    let status = bed
        .command(Ns::Client, program)?
        .args(args)
        .env("LOCKSTEP_GUEST", bed.addresses().guest.to_string())
        .status()
        .map_err(|source| TestbedError::File {
            what: "cannot run",
            path: program.into(),
            source,
        })?;
    Ok(status.code().unwrap_or(1))
}

/// `lockstep testbed up|down|status|cut|restore|shape`.
pub fn run(action: Action) -> Result<(), TestbedError> {
    match action {
        Action::Up {
            client_link,
            log_link,
            mgmt_link,
        } => {
            let bed = Testbed::up(&crate::Config {
                client_link,
                log_link,
                mgmt_link,
                ..crate::Config::new("manual")
            })?;
            let status = bed.status()?;
            let at = bed.addresses().clone();
            let (a, client) = (bed.netns(Ns::A), bed.netns(Ns::Client));
            let run = bed.keep()?.run;
            print!("{status}");
            println!(
                "testbed {run} stays until `lockstep testbed down {run}`. Try:\n  ip netns exec {a} lockstep run --guest net --tap {} --arg {}\n  ip netns exec {client} redis-cli -h {} ping      (or: lockstep client --run {run} -- redis-cli -h {} ping)",
                crate::TAP,
                at.guest_arg(),
                at.guest,
                at.guest
            );
            Ok(())
        }
        Action::Down { run, all } => {
            let removed = Testbed::clean_stale()?;
            for run in &removed {
                println!("removed stale testbed {run}");
            }
            let runs: Vec<String> = match (run, all) {
                (Some(run), false) => vec![run],
                (None, true) => Testbed::list()?.into_iter().map(|(r, _)| r.run).collect(),
                (Some(_), true) => {
                    return Err(TestbedError::Choice(
                        "pass a run id or --all, not both".into(),
                    ));
                }
                (None, false) if !removed.is_empty() => Vec::new(),
                (None, false) => {
                    return Err(TestbedError::Choice(
                        "which testbed? pass a run id (`lockstep testbed status`) or --all".into(),
                    ));
                }
            };
            for run in runs {
                Testbed::down(&run)?;
                println!("removed testbed {run}");
            }
            Ok(())
        }
        Action::Status { run } => {
            let records = Testbed::list()?;
            if records.is_empty() {
                println!("no testbeds on this host");
            }
            for (record, alive) in records {
                if run.as_deref().is_some_and(|run| run != record.run) {
                    continue;
                }
                if !alive {
                    println!(
                        "testbed {} ({}): STALE, owner pid {} is gone (removed at the next start or by `lockstep testbed down`)",
                        record.run, record.label, record.pid
                    );
                    continue;
                }
                print!("{}", Testbed::attach(&record.run)?.status()?);
            }
            Ok(())
        }
        Action::Cut { link, run } => {
            pick(run.as_deref(), None)?.cut(link)?;
            println!("cut {link}");
            Ok(())
        }
        Action::Restore { link, run } => {
            pick(run.as_deref(), None)?.restore(link)?;
            println!("restored {link}");
            Ok(())
        }
        Action::Shape { link, rate, run } => {
            pick(run.as_deref(), None)?.set_rate(link, rate)?;
            println!("{link} shaped: {rate}");
            Ok(())
        }
    }
}
