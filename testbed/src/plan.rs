//! The pure part of the testbed: names, subnets, addresses, shaping
//! parameters and the state record, computed from a run's slot. Nothing
//! here touches the system, so all of it is unit-tested.
//!
//! A run holds one *slot* (0..[`MAX_SLOTS`]); everything else follows from
//! it. The run id is the slot in decimal, the namespaces are
//! `lst-<run>-client`, `lst-<run>-a`, `lst-<run>-b`, `lst-<run>-arb`, and the
//! three subnets are consecutive /24s of one block:
//!
//! ```text
//!   slot s:  X = 100 + s / 64,  Y = (s % 64) * 4
//!   10.X.Y.0/24     client segment: client .1 (on the switch), guest .2,
//!                   host a .11 and host b .12 (on their host bridges)
//!   10.X.Y+1.0/24   logging link:   host a .1, host b .2
//!   10.X.Y+2.0/24   management:     arbiter .1, host a .2, host b .3
//! ```
//!
//! The ranges live only inside the run's own namespaces, which have no route
//! anywhere else; different slots never share a subnet, so two runs at once
//! never collide even in what they print.

use std::fmt;
use std::net::Ipv4Addr;

/// The prefix of every namespace the testbed creates.
pub const PREFIX: &str = "lst";

/// How many runs can exist at once on one host.
pub const MAX_SLOTS: u16 = 4096;

/// The guest's MAC address: the same as `vmm::DEFAULT_MAC` (checked by a
/// test in the `lockstep` crate), since the testbed stays a leaf crate.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x4c, 0x4b, 0x53, 0x54, 0x02];

/// The name of the guest's TAP interface in host a and in host b.
pub const TAP: &str = "tap0";

/// One of the testbed's emulated machines, each a network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ns {
    /// The client: stock clients (redis-cli, iperf3) run here. It also holds
    /// the switch (`sw0`), the bridge of the client-facing segment.
    Client,
    /// Host a: the primary's host (and the FT-off VM's).
    A,
    /// Host b: the backup's host.
    B,
    /// The arbiter's host, reached by both hosts over the management network.
    Arbiter,
}

impl Ns {
    /// Every namespace of a testbed.
    pub const ALL: [Ns; 4] = [Ns::Client, Ns::A, Ns::B, Ns::Arbiter];

    /// The suffix of its namespace name.
    pub fn suffix(self) -> &'static str {
        match self {
            Ns::Client => "client",
            Ns::A => "a",
            Ns::B => "b",
            Ns::Arbiter => "arb",
        }
    }

    /// The other replica host (a for b, b for a); `None` for the others.
    pub fn peer(self) -> Option<Ns> {
        match self {
            Ns::A => Some(Ns::B),
            Ns::B => Some(Ns::A),
            _ => None,
        }
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ns::Client => "client",
            Ns::A => "host a",
            Ns::B => "host b",
            Ns::Arbiter => "arbiter",
        })
    }
}

/// The namespace name of `ns` in run `run`: `lst-<run>-<suffix>`.
pub fn namespace_name(run: &str, ns: Ns) -> String {
    format!("{PREFIX}-{run}-{}", ns.suffix())
}

/// The run id and namespace of a testbed namespace name, if it is one.
pub fn parse_namespace_name(name: &str) -> Option<(String, Ns)> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let (run, suffix) = rest.rsplit_once('-')?;
    if run.is_empty() || !run.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ns = Ns::ALL.into_iter().find(|ns| ns.suffix() == suffix)?;
    Some((run.to_string(), ns))
}

/// How many extra hosts (e.g. etcd members) a run may add to its
/// management network ([`crate::Testbed::add_host`]).
pub const MAX_EXTRA_HOSTS: u8 = 8;

/// The namespace name of extra host `i` of run `run`: `lst-<run>-x<i>`.
pub fn extra_host_name(run: &str, i: u8) -> String {
    format!("{PREFIX}-{run}-x{i}")
}

/// The run id of slot `slot`.
pub fn run_id(slot: u16) -> String {
    slot.to_string()
}

/// A link of the testbed: a veth pair, shaped on the egress of each end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// Host a's client-facing link: its uplink to the switch.
    ClientA,
    /// Host b's client-facing link.
    ClientB,
    /// The logging link between host a and host b.
    Log,
    /// Host a's management link to the arbiter.
    MgmtA,
    /// Host b's management link to the arbiter.
    MgmtB,
}

impl Link {
    /// Every link of a testbed.
    pub const ALL: [Link; 5] = [
        Link::ClientA,
        Link::ClientB,
        Link::Log,
        Link::MgmtA,
        Link::MgmtB,
    ];

    /// Its two ends: (namespace, interface name) each.
    pub fn ends(self) -> [(Ns, &'static str); 2] {
        match self {
            Link::ClientA => [(Ns::A, "up0"), (Ns::Client, "a0")],
            Link::ClientB => [(Ns::B, "up0"), (Ns::Client, "b0")],
            Link::Log => [(Ns::A, "log0"), (Ns::B, "log0")],
            Link::MgmtA => [(Ns::A, "mg0"), (Ns::Arbiter, "a0")],
            Link::MgmtB => [(Ns::B, "mg0"), (Ns::Arbiter, "b0")],
        }
    }

    /// The client link of host `ns` (a or b).
    pub fn client_of(ns: Ns) -> Option<Link> {
        match ns {
            Ns::A => Some(Link::ClientA),
            Ns::B => Some(Link::ClientB),
            _ => None,
        }
    }

    /// A short name, as `lockstep testbed` takes and prints it.
    pub fn name(self) -> &'static str {
        match self {
            Link::ClientA => "client-a",
            Link::ClientB => "client-b",
            Link::Log => "log",
            Link::MgmtA => "mgmt-a",
            Link::MgmtB => "mgmt-b",
        }
    }

    /// The link called `name` (see [`Link::name`]).
    pub fn from_name(name: &str) -> Option<Link> {
        Link::ALL.into_iter().find(|link| link.name() == name)
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A link's rate, the same in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// No qdisc: as fast as the veth goes (about 11 Gbit/s here).
    Unshaped,
    /// A token bucket at this many Mbit/s on each end's egress.
    Mbit(u64),
}

impl Rate {
    /// The tbf for this rate (`None` when unshaped).
    pub fn tbf(self) -> Option<Tbf> {
        match self {
            Rate::Unshaped => None,
            Rate::Mbit(mbit) => Some(Tbf::for_rate(mbit)),
        }
    }

    /// Parses `unshaped`/`none`/`0` or a rate: `1000`, `1000mbit`, `1gbit`, `10g`.
    pub fn parse(text: &str) -> Option<Rate> {
        let text = text.trim().to_ascii_lowercase();
        if matches!(text.as_str(), "unshaped" | "none" | "off" | "0") {
            return Some(Rate::Unshaped);
        }
        let (number, scale) =
            if let Some(n) = text.strip_suffix("gbit").or_else(|| text.strip_suffix('g')) {
                (n, 1000)
            } else if let Some(n) = text.strip_suffix("mbit").or_else(|| text.strip_suffix('m')) {
                (n, 1)
            } else {
                (text.as_str(), 1)
            };
        let mbit: u64 = number.trim().parse().ok()?;
        (mbit > 0).then_some(Rate::Mbit(mbit.checked_mul(scale)?))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Unshaped => f.write_str("unshaped"),
            Rate::Mbit(mbit) if mbit % 1000 == 0 => write!(f, "{} Gbit/s", mbit / 1000),
            Rate::Mbit(mbit) => write!(f, "{mbit} Mbit/s"),
        }
    }
}

/// A token-bucket filter: the one rate shaper this kernel has (no netem, no
/// fq, no classifiers), installed as the root qdisc of a veth end's egress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tbf {
    /// Rate in Mbit/s.
    pub rate_mbit: u64,
    /// Bucket size in bytes: how much may leave at line speed at once.
    pub burst_bytes: u64,
    /// How long a packet may wait in the queue before it is dropped, in ms.
    pub latency_ms: u64,
}

impl Tbf {
    /// The default shaping for `rate_mbit`: a bucket of 2 ms of traffic (at
    /// least 16 KiB, so a full-size frame always fits), a 10 ms queue. At
    /// 1 Gbit/s that is 250 kB, as in the measurement that gave 953 Mbit/s
    /// over a veth.
    pub fn for_rate(rate_mbit: u64) -> Tbf {
        let bytes_per_second = rate_mbit.saturating_mul(1_000_000) / 8;
        Tbf {
            rate_mbit,
            burst_bytes: (bytes_per_second / 500).max(16 * 1024),
            latency_ms: 10,
        }
    }

    /// The `tc qdisc replace` arguments after `dev IFACE root`.
    pub fn tc_args(&self) -> Vec<String> {
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}mbit", self.rate_mbit),
            "burst".into(),
            self.burst_bytes.to_string(),
            "latency".into(),
            format!("{}ms", self.latency_ms),
        ]
    }
}

/// Every address of a run (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// The guest's address on the client segment.
    pub guest: Ipv4Addr,
    /// The client segment's prefix length (and the guest's).
    pub prefix: u8,
    /// The client's address on the client segment (on the switch `sw0`).
    pub client: Ipv4Addr,
    /// Host a's own address on the client segment (its bridge `br0`).
    pub lan_a: Ipv4Addr,
    /// Host b's own address on the client segment.
    pub lan_b: Ipv4Addr,
    /// Host a's end of the logging link.
    pub log_a: Ipv4Addr,
    /// Host b's end of the logging link.
    pub log_b: Ipv4Addr,
    /// The arbiter's address on the management network.
    pub arbiter: Ipv4Addr,
    /// Host a's address on the management network.
    pub mgmt_a: Ipv4Addr,
    /// Host b's address on the management network.
    pub mgmt_b: Ipv4Addr,
}

impl Addresses {
    /// The addresses of slot `slot` (below [`MAX_SLOTS`]).
    pub fn for_slot(slot: u16) -> Addresses {
        let x = 100 + (slot / 64) as u8;
        let y = ((slot % 64) * 4) as u8;
        let at = |offset: u8, host: u8| Ipv4Addr::new(10, x, y + offset, host);
        Addresses {
            guest: at(0, 2),
            prefix: 24,
            client: at(0, 1),
            lan_a: at(0, 11),
            lan_b: at(0, 12),
            log_a: at(1, 1),
            log_b: at(1, 2),
            arbiter: at(2, 1),
            mgmt_a: at(2, 2),
            mgmt_b: at(2, 3),
        }
    }

    /// The `net` guest's `--arg` that puts it at [`Addresses::guest`]: the
    /// address in bits 0..32, the prefix length in bits 32..40 (the
    /// encoding `guest_abi::net_address_from_arg` decodes).
    pub fn guest_arg(&self) -> u64 {
        u64::from(u32::from(self.guest)) | (u64::from(self.prefix) << 32)
    }

    /// Host `ns`'s end of the logging link (a or b).
    pub fn log(&self, ns: Ns) -> Option<Ipv4Addr> {
        match ns {
            Ns::A => Some(self.log_a),
            Ns::B => Some(self.log_b),
            _ => None,
        }
    }

    /// Host `ns`'s address on the management network (a or b).
    pub fn mgmt(&self, ns: Ns) -> Option<Ipv4Addr> {
        match ns {
            Ns::A => Some(self.mgmt_a),
            Ns::B => Some(self.mgmt_b),
            _ => None,
        }
    }

    /// Extra host `i`'s address on the management network (`.21 + i`).
    pub fn extra_host(&self, i: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.arbiter.octets();
        Ipv4Addr::new(a, b, c, 21 + i.min(MAX_EXTRA_HOSTS))
    }

    /// Host `ns`'s own address on the client segment (a or b).
    pub fn lan(&self, ns: Ns) -> Option<Ipv4Addr> {
        match ns {
            Ns::A => Some(self.lan_a),
            Ns::B => Some(self.lan_b),
            _ => None,
        }
    }
}

/// What `/run/lockstep-testbed/<run>.state` says about a run: one
/// `key value` pair per line.
///
/// ```text
/// run 7
/// slot 7
/// pid 41235          the owner; the run is stale once it is gone
/// start 1234567      the owner's start time (/proc/PID/stat field 22),
///                    so that a reused pid is not taken for the owner
/// persistent 0       1: kept after its owner exits (`lockstep testbed up`)
/// label up           who made it (`up`, `test`, `chaos`, `bench`, …)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The run id.
    pub run: String,
    /// Its slot.
    pub slot: u16,
    /// The owner's pid.
    pub pid: u32,
    /// The owner's start time in clock ticks since boot.
    pub start: u64,
    /// Kept until `lockstep testbed down` removes it.
    pub persistent: bool,
    /// A free-form word naming what made it.
    pub label: String,
}

impl Record {
    /// The record as the state file holds it.
    pub fn to_text(&self) -> String {
        format!(
            "run {}\nslot {}\npid {}\nstart {}\npersistent {}\nlabel {}\n",
            self.run,
            self.slot,
            self.pid,
            self.start,
            u8::from(self.persistent),
            self.label
        )
    }

    /// Parses a state file; the error says which line is wrong.
    pub fn parse(text: &str) -> Result<Record, String> {
        let mut fields = std::collections::HashMap::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {}: `{line}` is not `key value`", number + 1))?;
            fields.insert(key.to_string(), value.trim().to_string());
        }
        let field = |key: &str| {
            fields
                .get(key)
                .map(String::as_str)
                .ok_or_else(|| format!("no `{key}` line"))
        };
        let number = |key: &str| -> Result<u64, String> {
            let value = field(key)?;
            value
                .parse()
                .map_err(|_| format!("`{key} {value}`: not a number"))
        };
        let slot = number("slot")?;
        if slot >= u64::from(MAX_SLOTS) {
            return Err(format!("slot {slot} is out of range"));
        }
        let run = field("run")?.to_string();
        if run != run_id(slot as u16) {
            return Err(format!("run {run} does not match slot {slot}"));
        }
        Ok(Record {
            run,
            slot: slot as u16,
            pid: u32::try_from(number("pid")?).map_err(|_| "pid out of range".to_string())?,
            start: number("start")?,
            persistent: number("persistent")? != 0,
            label: field("label").unwrap_or("").to_string(),
        })
    }
}

/// The start time (field 22, clock ticks since boot) in a `/proc/PID/stat`
/// line. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted after its last `)`.
pub fn start_time_from_stat(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_round_trip_and_fit_the_prefix() {
        for slot in [0, 7, 4095] {
            let run = run_id(slot);
            for ns in Ns::ALL {
                let name = namespace_name(&run, ns);
                assert!(name.starts_with("lst-"));
                assert_eq!(parse_namespace_name(&name), Some((run.clone(), ns)));
            }
        }
        assert_eq!(namespace_name("7", Ns::Client), "lst-7-client");
        assert_eq!(parse_namespace_name("lst-x-a"), None);
        assert_eq!(parse_namespace_name("lst-7-c"), None);
        assert_eq!(parse_namespace_name("lstx-7-a"), None);
        assert_eq!(parse_namespace_name("other"), None);
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        for link in Link::ALL {
            for (_, name) in link.ends() {
                assert!(name.len() < 16, "{name}");
            }
            assert_eq!(Link::from_name(link.name()), Some(link));
        }
        assert!(TAP.len() < 16);
    }

    #[test]
    fn extra_hosts_sit_on_the_management_subnet_apart_from_the_others() {
        let a = Addresses::for_slot(4095);
        let fixed = [a.arbiter, a.mgmt_a, a.mgmt_b];
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_EXTRA_HOSTS {
            let x = a.extra_host(i);
            assert_eq!(x.octets()[..3], a.arbiter.octets()[..3], "{x}");
            assert!(!fixed.contains(&x) && seen.insert(x), "{x}");
            let name = extra_host_name("4095", i);
            assert!(name.len() < 32, "{name}");
            assert_eq!(parse_namespace_name(&name), None, "{name}");
        }
    }

    #[test]
    fn slots_never_share_a_subnet() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..MAX_SLOTS {
            let a = Addresses::for_slot(slot);
            for address in [a.client, a.log_a, a.arbiter] {
                let [p, q, r, _] = address.octets();
                assert_eq!(p, 10);
                assert!(seen.insert((q, r)), "slot {slot} reuses 10.{q}.{r}.0/24");
            }
            for address in [a.guest, a.lan_a, a.lan_b] {
                assert_eq!(address.octets()[..3], a.client.octets()[..3]);
            }
            assert_eq!(a.log_b.octets()[..3], a.log_a.octets()[..3]);
            assert_eq!(a.mgmt_a.octets()[..3], a.arbiter.octets()[..3]);
            assert_eq!(a.mgmt_b.octets()[..3], a.arbiter.octets()[..3]);
        }
    }

    #[test]
    fn the_guest_argument_encodes_address_and_prefix() {
        let a = Addresses::for_slot(65);
        assert_eq!(a.guest, Ipv4Addr::new(10, 101, 4, 2));
        let arg = a.guest_arg();
        assert_eq!((arg as u32).to_be_bytes(), [10, 101, 4, 2]);
        assert_eq!(arg >> 32, 24);
        assert_eq!(a.log(Ns::B), Some(Ipv4Addr::new(10, 101, 5, 2)));
        assert_eq!(a.log(Ns::Client), None);
    }

    #[test]
    fn tbf_keeps_a_full_frame_in_its_bucket_at_any_rate() {
        let gigabit = Tbf::for_rate(1000);
        assert_eq!(gigabit.burst_bytes, 250_000);
        assert_eq!(
            gigabit.tc_args().join(" "),
            "tbf rate 1000mbit burst 250000 latency 10ms"
        );
        assert_eq!(Tbf::for_rate(10_000).burst_bytes, 2_500_000);
        assert_eq!(Tbf::for_rate(1).burst_bytes, 16 * 1024);
    }

    #[test]
    fn rates_parse_and_print() {
        assert_eq!(Rate::parse("1gbit"), Some(Rate::Mbit(1000)));
        assert_eq!(Rate::parse("10G"), Some(Rate::Mbit(10_000)));
        assert_eq!(Rate::parse("250mbit"), Some(Rate::Mbit(250)));
        assert_eq!(Rate::parse("250"), Some(Rate::Mbit(250)));
        assert_eq!(Rate::parse("unshaped"), Some(Rate::Unshaped));
        assert_eq!(Rate::parse("0"), Some(Rate::Unshaped));
        assert_eq!(Rate::parse("fast"), None);
        assert_eq!(Rate::parse("-3"), None);
        assert_eq!(Rate::Mbit(1000).to_string(), "1 Gbit/s");
        assert_eq!(Rate::Mbit(250).to_string(), "250 Mbit/s");
        assert_eq!(Rate::Unshaped.tbf(), None);
    }

    #[test]
    fn records_round_trip_and_bad_ones_say_why() {
        let record = Record {
            run: "7".into(),
            slot: 7,
            pid: 4242,
            start: 99,
            persistent: true,
            label: "up".into(),
        };
        assert_eq!(Record::parse(&record.to_text()), Ok(record.clone()));
        let broken = record.to_text().replace("pid 4242", "pid x");
        assert_eq!(Record::parse(&broken), Err("`pid x`: not a number".into()));
        let mismatched = record.to_text().replace("run 7", "run 8");
        assert!(Record::parse(&mismatched).is_err());
        assert!(Record::parse("garbage").is_err());
        assert!(Record::parse("").is_err());
    }

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "4242 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20";
        assert_eq!(start_time_from_stat(stat), Some(777));
        assert_eq!(start_time_from_stat("4242 (x) S 1"), None);
    }
}
