//! A config file over the command line: every value the file gives fills
//! the flag it stands for unless the command line gave that flag itself
//! (clap tells which values came from the command line; defaults do not
//! override). The file's format and checks are `lockstep_config`'s.

use std::path::PathBuf;

use clap::ArgMatches;
use clap::parser::ValueSource;
use lockstep_config::Loaded;
use toml::Spanned;

use crate::RunArgs;
use crate::ft::FtArgs;

/// Whether the command line itself gave argument `id` (not a default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine))
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
pub(crate) fn apply_replica(loaded: &Loaded, matches: &ArgMatches, ft: &mut FtArgs) {
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

/// Fills a primary's flags from the file where the command line left
/// them unset.
pub(crate) fn apply_primary(loaded: &Loaded, matches: &ArgMatches, primary: &mut PrimaryFlags<'_>) {
    let g = &loaded.file.guest;
    let run = &mut *primary.run;
    take!(
        matches,
        "guest",
        run.guest,
        g.name.as_ref().map(|v| v.get_ref().clone())
    );
    take!(
        matches,
        "mem_mib",
        run.mem_mib,
        g.mem_mib.as_ref().map(|v| *v.get_ref())
    );
    take!(
        matches,
        "arg",
        run.arg,
        g.arg.as_ref().map(|v| *v.get_ref())
    );
    take!(
        matches,
        "input",
        run.input,
        g.input.as_ref().map(|v| Some(v.get_ref().clone()))
    );
    take!(
        matches,
        "allow_rdtsc",
        run.allow_rdtsc,
        g.allow_rdtsc.as_ref().map(|v| *v.get_ref())
    );
    take!(matches, "quiet", run.quiet, g.quiet);
    take!(matches, "tap", run.tap, g.tap.clone().map(Some));
    take!(
        matches,
        "digest_interval",
        *primary.digest_interval,
        g.digest_interval.as_ref().map(|v| *v.get_ref())
    );
    if let Some(p) = loaded.file.primary.as_ref().map(Spanned::get_ref) {
        take!(matches, "backup", *primary.backup, p.backup.clone());
        take!(
            matches,
            "backup_id",
            *primary.backup_id,
            p.backup_id.clone()
        );
        take!(
            matches,
            "join_listen",
            *primary.join_listen,
            p.join_listen.clone().map(Some)
        );
        take!(matches, "stats", *primary.stats, p.stats.clone().map(Some));
    }
    take!(
        matches,
        "metrics",
        *primary.metrics,
        loaded
            .file
            .metrics
            .as_ref()
            .map(|m| Some(m.get_ref().clone()))
    );
}

/// Fills a backup's flags from the file where the command line left
/// them unset.
pub(crate) fn apply_backup(loaded: &Loaded, matches: &ArgMatches, backup: &mut BackupFlags<'_>) {
    let g = &loaded.file.guest;
    take!(matches, "tap", *backup.tap, g.tap.clone().map(Some));
    take!(matches, "quiet", *backup.quiet, g.quiet);
    if let Some(b) = loaded.file.backup.as_ref().map(Spanned::get_ref) {
        take!(matches, "listen", *backup.listen, b.listen.clone());
        take!(matches, "join", *backup.join, b.join.clone().map(Some));
        take!(
            matches,
            "join_listen",
            *backup.join_listen,
            b.join_listen.clone().map(Some)
        );
    }
    take!(
        matches,
        "metrics",
        *backup.metrics,
        loaded
            .file
            .metrics
            .as_ref()
            .map(|m| Some(m.get_ref().clone()))
    );
}

/// The primary's own flags, borrowed from the parsed command.
pub(crate) struct PrimaryFlags<'a> {
    pub run: &'a mut RunArgs,
    pub backup: &'a mut String,
    pub backup_id: &'a mut String,
    pub join_listen: &'a mut Option<String>,
    pub stats: &'a mut Option<PathBuf>,
    pub digest_interval: &'a mut u64,
    pub metrics: &'a mut Option<String>,
}

/// The backup's own flags, borrowed from the parsed command.
pub(crate) struct BackupFlags<'a> {
    pub listen: &'a mut String,
    pub tap: &'a mut Option<String>,
    pub join: &'a mut Option<String>,
    pub join_listen: &'a mut Option<String>,
    pub quiet: &'a mut bool,
    pub metrics: &'a mut Option<String>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    use lockstep_config::EXAMPLE_PRIMARY as FULL;

    #[test]
    fn flags_override_the_file_and_defaults_do_not() {
        use clap::{CommandFactory, FromArgMatches};
        let loaded =
            lockstep_config::parse(Path::new("test.toml"), FULL.to_string()).expect("parses");
        let matches = crate::Cli::command()
            .try_get_matches_from(["lockstep", "primary", "--mem-mib", "64", "--vm-id", "9"])
            .expect("parses");
        let cli = crate::Cli::from_arg_matches(&matches).expect("command");
        let sub = matches.subcommand_matches("primary").expect("primary");
        let crate::Command::Primary {
            mut backup,
            mut backup_id,
            mut run,
            mut ft,
            mut stats,
            mut digest_interval,
            mut join_listen,
            mut ops,
            ..
        } = cli.command
        else {
            panic!("not primary");
        };
        apply_replica(&loaded, sub, &mut ft);
        apply_primary(
            &loaded,
            sub,
            &mut PrimaryFlags {
                run: &mut run,
                backup: &mut backup,
                backup_id: &mut backup_id,
                join_listen: &mut join_listen,
                stats: &mut stats,
                digest_interval: &mut digest_interval,
                metrics: &mut ops.metrics,
            },
        );
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
        assert_eq!(ops.metrics.as_deref(), Some("127.0.0.1:9400"));
    }
}
