//! A config file over the command line: every value the file gives fills
//! the flag it stands for unless the command line gave that flag itself
//! (clap tells which values came from the command line; defaults do not
//! override). The file's format and checks are in the crate root; the
//! binary loads the file, calls [`apply`] and runs the [`Role`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::ArgMatches;
use clap::parser::ValueSource;
use replica::command::CommandError;
use replica::pair::{BackupArgs, FtArgs, PrimaryArgs};
use toml::Spanned;

use crate::{self as config, Loaded};

/// Whether the command line itself gave argument `id` (not a default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine))
}

/// The value of a key the file may give.
fn value<T: Clone>(key: &Option<Spanned<T>>) -> Option<T> {
    key.as_ref().map(|v| v.get_ref().clone())
}

/// Sets `$target` from the file unless the flag `$id` was given.
macro_rules! take {
    ($matches:expr, $id:literal, $target:expr, $value:expr) => {
        if !given($matches, $id)
            && let Some(value) = $value
        {
            $target = value;
        }
    };
}

/// Fills `ft` from `[replica]` where the command line left it unset.
pub fn apply_replica(loaded: &Loaded, matches: &ArgMatches, ft: &mut FtArgs) {
    let r = &loaded.file.replica;
    take!(
        matches,
        "arbiter",
        ft.arbiter,
        r.arbiter.as_ref().map(|a| Some(a.get_ref().0.clone()))
    );
    take!(
        matches,
        "arbiter_key",
        ft.arbiter_key,
        r.arbiter_key.as_ref().map(|p| Some(p.get_ref().clone()))
    );
    take!(matches, "vm_id", ft.vm_id, r.vm_id);
    take!(
        matches,
        "id",
        ft.id,
        r.id.as_ref().map(|i| Some(i.get_ref().clone()))
    );
    take!(
        matches,
        "heartbeat_ms",
        ft.liveness.heartbeat_ms,
        r.heartbeat_ms.map(|t| t.0)
    );
    take!(
        matches,
        "peer_timeout_ms",
        ft.liveness.peer_timeout_ms,
        r.peer_timeout_ms.map(|t| t.0)
    );
    take!(matches, "status_dir", ft.status_dir, r.status_dir.clone());
    take!(matches, "transport", ft.transport, r.transport.map(|t| t.0));
    take!(
        matches,
        "link_key",
        ft.link_key,
        r.link_key.as_ref().map(|p| Some(p.get_ref().clone()))
    );
    let a = &loaded.file.arbiter;
    let path = |p: &Option<Spanned<PathBuf>>| p.as_ref().map(|p| Some(p.get_ref().clone()));
    take!(matches, "etcd_ca", ft.etcd.etcd_ca, path(&a.ca));
    take!(matches, "etcd_cert", ft.etcd.etcd_cert, path(&a.cert));
    take!(matches, "etcd_key", ft.etcd.etcd_key, path(&a.key));
    take!(
        matches,
        "etcd_user",
        ft.etcd.etcd_user,
        a.user.as_ref().map(|u| Some(u.get_ref().clone()))
    );
    take!(
        matches,
        "etcd_password_file",
        ft.etcd.etcd_password_file,
        path(&a.password_file)
    );
}

/// A replica command whose flags a config file can fill: `lockstep
/// primary` or `lockstep backup`. The binary loads the file, checks its
/// role ([`Role::ROLE`]), fills `[replica]` ([`apply_replica`]), the role's
/// own section ([`Role::fill`]) and `metrics` ([`apply`]), serves the
/// metrics and runs the role.
pub trait Role {
    /// The role a config file must be written for.
    const ROLE: config::Role;
    /// Its name in the metrics.
    const NAME: &'static str;
    /// The arbiter, link and name flags.
    fn ft(&mut self) -> &mut FtArgs;
    /// Fills this role's own flags from `loaded`.
    fn fill(&mut self, loaded: &Loaded, matches: &ArgMatches);
    /// Runs the role.
    fn run(&self, stop: Arc<AtomicBool>) -> Result<(), CommandError>;
}

/// Fills `args` (and `metrics`) from the file where the command line left
/// them unset.
pub fn apply<R: Role>(
    loaded: &Loaded,
    matches: &ArgMatches,
    args: &mut R,
    metrics: &mut Option<String>,
) {
    apply_replica(loaded, matches, args.ft());
    args.fill(loaded, matches);
    take!(
        matches,
        "metrics",
        *metrics,
        value(&loaded.file.metrics).map(Some)
    );
}

impl Role for PrimaryArgs {
    const ROLE: config::Role = config::Role::Primary;
    const NAME: &'static str = "primary";

    fn ft(&mut self) -> &mut FtArgs {
        &mut self.ft
    }

    fn fill(&mut self, loaded: &Loaded, matches: &ArgMatches) {
        let (g, run) = (&loaded.file.guest, &mut self.run);
        take!(matches, "guest", run.guest, value(&g.name));
        take!(matches, "mem_mib", run.mem_mib, value(&g.mem_mib));
        take!(matches, "arg", run.arg, value(&g.arg));
        take!(matches, "input", run.input, value(&g.input).map(Some));
        take!(
            matches,
            "allow_rdtsc",
            run.allow_rdtsc,
            value(&g.allow_rdtsc)
        );
        take!(matches, "quiet", run.quiet, g.quiet);
        take!(matches, "tap", run.tap, g.tap.clone().map(Some));
        let digests = value(&g.digest_interval);
        take!(matches, "digest_interval", self.digest_interval, digests);
        if let Some(p) = loaded.file.primary.as_ref().map(Spanned::get_ref) {
            take!(matches, "backup", self.backup, p.backup.clone());
            take!(matches, "backup_id", self.backup_id, p.backup_id.clone());
            let join_listen = p.join_listen.clone().map(Some);
            take!(matches, "join_listen", self.join_listen, join_listen);
            take!(matches, "stats", self.stats, p.stats.clone().map(Some));
        }
    }

    fn run(&self, stop: Arc<AtomicBool>) -> Result<(), CommandError> {
        replica::pair::run_primary(self, stop)
    }
}

impl Role for BackupArgs {
    const ROLE: config::Role = config::Role::Backup;
    const NAME: &'static str = "backup";

    fn ft(&mut self) -> &mut FtArgs {
        &mut self.ft
    }

    fn fill(&mut self, loaded: &Loaded, matches: &ArgMatches) {
        let g = &loaded.file.guest;
        take!(matches, "tap", self.tap, g.tap.clone().map(Some));
        take!(matches, "quiet", self.quiet, g.quiet);
        if let Some(b) = loaded.file.backup.as_ref().map(Spanned::get_ref) {
            take!(matches, "listen", self.listen, b.listen.clone());
            take!(matches, "join", self.join, b.join.clone().map(Some));
            let join_listen = b.join_listen.clone().map(Some);
            take!(matches, "join_listen", self.join_listen, join_listen);
        }
    }

    fn run(&self, stop: Arc<AtomicBool>) -> Result<(), CommandError> {
        replica::pair::run_backup(self, stop)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    use crate::EXAMPLE_PRIMARY as FULL;

    /// `lockstep primary`'s flags: the role's and the binary's `--metrics`.
    #[derive(clap::Parser)]
    struct Primary {
        #[command(flatten)]
        primary: PrimaryArgs,
        #[arg(long)]
        metrics: Option<String>,
    }

    #[test]
    fn flags_override_the_file_and_defaults_do_not() {
        use clap::{CommandFactory, FromArgMatches};
        let loaded = crate::parse(Path::new("test.toml"), FULL.to_string()).expect("parses");
        let matches = Primary::command()
            .try_get_matches_from(["primary", "--mem-mib", "64", "--vm-id", "9"])
            .expect("parses");
        let Primary {
            mut primary,
            mut metrics,
        } = Primary::from_arg_matches(&matches).expect("command");
        assert_eq!(metrics, None, "no --metrics given");
        apply(&loaded, &matches, &mut primary, &mut metrics);
        let PrimaryArgs {
            run,
            ft,
            digest_interval,
            backup,
            backup_id,
            join_listen,
            ..
        } = primary;
        assert_eq!(run.mem_mib, 64, "the flag wins");
        assert_eq!(ft.vm_id, 9, "the flag wins");
        assert_eq!(run.guest, "net", "the file fills a default");
        assert_eq!(run.arg, 5);
        assert!(run.quiet);
        assert_eq!(run.tap.as_deref(), Some("tap0"));
        assert_eq!(digest_interval, 50);
        assert_eq!(backup, "10.1.0.2:7700");
        assert_eq!(backup_id, "host-b");
        assert_eq!(join_listen.as_deref(), Some("10.1.0.1:7800"));
        assert_eq!(ft.id.as_deref(), Some("host-a"));
        assert_eq!(ft.liveness.peer_timeout_ms, 800);
        assert_eq!(ft.transport, replica::link::TransportKind::Shm);
        assert_eq!(ft.status_dir, PathBuf::from("/run/x"));
        assert_eq!(metrics.as_deref(), Some("127.0.0.1:9400"));
    }
}
