//! What Table 2 measures: directions, configurations and the scenarios
//! (client-link shapes) that group them into rows, and the paper's figures.
//!
//! ```text
//!  scenario "paper"    client link 1 Gbit/s each way
//!     FT off                      one VM on host a                  (the base of every row below)
//!     FT on  tcp-1g               host a ══ log link 1 Gbit/s ══ host b
//!     FT on  tcp-10g              host a ══ log link 10 Gbit/s ═ host b
//!     FT on  shm                  both replicas' log over shared memory (same host)
//!  scenario "unshaped" nothing shaped: CPU-bound
//!     FT off, FT on tcp           primary-host CPU per Gbit/s, FT on against FT off
//! ```
//!
//! A row is (scenario, direction, FT-on variant) against the FT-off runs of
//! its scenario in the same rounds; its gate key is `DIRECTION.VARIANT`
//! (`receive.tcp-1g`, `transmit.shm`, `receive.unshaped-tcp`).

/// The paper's Table 2 (VMware FT, 2010), Mbit/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paper {
    /// receive or transmit.
    pub test: &'static str,
    /// FT off.
    pub ft_off: f64,
    /// FT on with a 1 Gbit/s logging link.
    pub ft_on_1g: f64,
    /// FT on with a 10 Gbit/s logging link.
    pub ft_on_10g: f64,
    /// Logging bandwidth with a 1 Gbit/s logging link.
    pub log_1g: f64,
    /// Logging bandwidth with a 10 Gbit/s logging link.
    pub log_10g: f64,
}

/// The paper's figures, per direction.
pub const PAPER: [Paper; 2] = [
    Paper {
        test: "receive",
        ft_off: 940.0,
        ft_on_1g: 604.0,
        ft_on_10g: 860.0,
        log_1g: 730.0,
        log_10g: 990.0,
    },
    Paper {
        test: "transmit",
        ft_off: 940.0,
        ft_on_1g: 855.0,
        ft_on_10g: 935.0,
        log_1g: 42.0,
        log_10g: 60.0,
    },
];

/// The issue's goal for FT/base with a 1 Gbit/s logging link (and for the
/// same-host and unshaped rows).
pub const GOAL_1G: f64 = 0.97;
/// The issue's goal for FT/base with a 10 Gbit/s logging link.
pub const GOAL_10G: f64 = 0.99;
/// The issue's goal for log bytes per client byte in receive.
pub const GOAL_LOG_PER_CLIENT_BYTE: f64 = 1.02;
/// The issue's goal for primary-host CPU per Gbit/s, FT on over FT off.
pub const GOAL_CPU_PER_GBIT: f64 = 1.15;

/// The paper's row for `direction`.
pub fn paper(direction: Direction) -> Paper {
    match direction {
        Direction::Receive => PAPER[0],
        Direction::Transmit => PAPER[1],
    }
}

/// Which way the client's bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Client to guest.
    Receive,
    /// Guest to client.
    Transmit,
}

impl Direction {
    /// Both, in table order.
    pub const ALL: [Direction; 2] = [Direction::Receive, Direction::Transmit];

    /// `receive` or `transmit`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Receive => "receive",
            Self::Transmit => "transmit",
        }
    }

    /// The direction named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// A logging-channel transport the benchmark drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// io_uring TCP across the hosts' logging link.
    Tcp,
    /// Shared memory between the two processes (one host).
    Shm,
}

impl Transport {
    /// The name used by `--transport`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
        }
    }
}

/// How an FT-on run carries its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    /// The channel's transport.
    pub transport: Transport,
    /// The logging link's rate each way, Mbit/s (`None`: unshaped, or no
    /// link at all for shm).
    pub log_mbit: Option<u32>,
}

impl Variant {
    /// io_uring TCP over a logging link shaped to `mbit` (or unshaped).
    pub const fn tcp(log_mbit: Option<u32>) -> Self {
        Self {
            transport: Transport::Tcp,
            log_mbit,
        }
    }

    /// Shared memory on one host.
    pub const fn shm() -> Self {
        Self {
            transport: Transport::Shm,
            log_mbit: None,
        }
    }

    /// `tcp-1g`, `tcp-10g`, `tcp-250m`, `tcp`, `shm`.
    pub fn name(self) -> String {
        match (self.transport, self.log_mbit) {
            (Transport::Shm, _) => "shm".into(),
            (Transport::Tcp, None) => "tcp".into(),
            (Transport::Tcp, Some(mbit)) => format!("tcp-{}", rate_name(mbit)),
        }
    }

    /// The ratio goal of a row of this variant.
    pub fn goal(self) -> f64 {
        match self.log_mbit {
            Some(mbit) if mbit >= 10_000 => GOAL_10G,
            _ => GOAL_1G,
        }
    }
}

/// `1g`, `10g`, `250m`.
pub fn rate_name(mbit: u32) -> String {
    if mbit.is_multiple_of(1000) {
        format!("{}g", mbit / 1000)
    } else {
        format!("{mbit}m")
    }
}

/// One process set of a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Config {
    /// `lockstep run`: one VM, output leaves at once.
    FtOff,
    /// `lockstep backup` + `lockstep primary`.
    FtOn(Variant),
}

impl Config {
    /// `ft-off`, `ft-on-tcp-1g`, ...
    pub fn name(self) -> String {
        match self {
            Self::FtOff => "ft-off".into(),
            Self::FtOn(variant) => format!("ft-on-{}", variant.name()),
        }
    }

    /// `FT off`, `FT on tcp-1g`, ...
    pub fn label(self) -> String {
        match self {
            Self::FtOff => "FT off".into(),
            Self::FtOn(variant) => format!("FT on {}", variant.name()),
        }
    }
}

/// A set of configurations measured under one client-link shape, every
/// FT-on variant against the same FT-off runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// `paper` or `unshaped`.
    pub name: &'static str,
    /// The client link's rate each way, Mbit/s (`None`: unshaped).
    pub client_mbit: Option<u32>,
    /// The FT-on variants (FT off is always measured too).
    pub variants: Vec<Variant>,
}

impl Scenario {
    /// The paper's setting: a 1 Gbit/s client link; FT on over a 1 and a
    /// 10 Gbit/s logging link, and over shared memory.
    pub fn paper() -> Self {
        Self {
            name: "paper",
            client_mbit: Some(1000),
            variants: vec![
                Variant::tcp(Some(1000)),
                Variant::tcp(Some(10_000)),
                Variant::shm(),
            ],
        }
    }

    /// Nothing shaped: the CPU-bound case, FT on over tcp.
    pub fn unshaped() -> Self {
        Self {
            name: "unshaped",
            client_mbit: None,
            variants: vec![Variant::tcp(None)],
        }
    }

    /// Every configuration, FT off first.
    pub fn configs(&self) -> Vec<Config> {
        let mut configs = vec![Config::FtOff];
        configs.extend(self.variants.iter().map(|&v| Config::FtOn(v)));
        configs
    }

    /// The gate key of the row of `variant` in `direction`:
    /// `receive.tcp-1g`; unshaped scenarios prefix the variant
    /// (`receive.unshaped-tcp`).
    pub fn key(&self, direction: Direction, variant: Variant) -> String {
        match self.client_mbit {
            Some(_) => format!("{}.{}", direction.name(), variant.name()),
            None => format!("{}.unshaped-{}", direction.name(), variant.name()),
        }
    }
}

/// The rows `lockstep bench table2` measures by default.
pub fn default_scenarios() -> Vec<Scenario> {
    vec![Scenario::paper(), Scenario::unshaped()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_direction_and_the_variant() {
        let paper = Scenario::paper();
        let keys: Vec<String> = paper
            .variants
            .iter()
            .map(|&v| paper.key(Direction::Receive, v))
            .collect();
        assert_eq!(keys, ["receive.tcp-1g", "receive.tcp-10g", "receive.shm"]);
        assert_eq!(
            Scenario::unshaped().key(Direction::Transmit, Variant::tcp(None)),
            "transmit.unshaped-tcp"
        );
        assert_eq!(Variant::tcp(Some(250)).name(), "tcp-250m");
    }

    #[test]
    fn goals_follow_the_logging_link() {
        assert_eq!(Variant::tcp(Some(1000)).goal(), GOAL_1G);
        assert_eq!(Variant::tcp(Some(10_000)).goal(), GOAL_10G);
        assert_eq!(Variant::shm().goal(), GOAL_1G);
    }

    #[test]
    fn paper_rows_match_the_table() {
        assert_eq!(paper(Direction::Receive).ft_on_1g, 604.0);
        assert_eq!(paper(Direction::Transmit).log_10g, 60.0);
        assert_eq!(Direction::from_name("transmit"), Some(Direction::Transmit));
        assert_eq!(Scenario::paper().configs()[0], Config::FtOff);
    }
}
