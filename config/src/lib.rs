//! Config files: one TOML file per host holds what `lockstep primary` and
//! `lockstep backup` take as flags, so that a service manager starts a
//! replica with `--config FILE` alone.
//!
//! ```toml
//! role = "primary"                 # or "backup": the command must match
//! metrics = "0.0.0.0:9400"         # --metrics (Prometheus /metrics)
//!
//! [replica]                        # both roles (the flags of FtArgs)
//! id = "host-a"                    # --id
//! vm_id = 1                        # --vm-id
//! arbiter = "etcd://10.0.0.5:2379,10.0.0.6:2379,10.0.0.7:2379"
//! arbiter_key = "/etc/lockstep/arbiter.key"
//! link_key = "/etc/lockstep/link.key"
//! transport = "tcp"                # tcp, shm or rdma
//! heartbeat_ms = 20                # --heartbeat-ms
//! peer_timeout_ms = 500            # --peer-timeout-ms (>= 3 heartbeats)
//! status_dir = "/run/lockstep"
//!
//! [arbiter]                        # an etcds:// arbiter's TLS and login (--etcd-*)
//! ca = "/etc/lockstep/etcd-ca.crt"        # --etcd-ca: the CA of the members' certificates
//! cert = "/etc/lockstep/etcd-client.crt"  # --etcd-cert (etcd's --client-cert-auth)
//! key = "/etc/lockstep/etcd-client.key"   # --etcd-key
//! user = "lockstep"                       # --etcd-user (etcd v3 auth)
//! password_file = "/etc/lockstep/etcd.password"  # --etcd-password-file, mode 0600
//!
//! [guest]                          # tap and quiet: both roles; the rest: primary only
//! name = "net"                     # --guest (the backup learns it from the primary)
//! mem_mib = 32
//! arg = 0
//! input = "/var/lib/lockstep/input"
//! allow_rdtsc = false
//! digest_interval = 1000
//! tap = "tap0"
//! quiet = true
//!
//! [primary]
//! backup = "10.1.0.2:7700"         # --backup
//! backup_id = "host-b"             # --backup-id
//! join_listen = "10.1.0.1:7800"    # --join-listen
//! stats = "/var/lib/lockstep/primary.json"
//!
//! [backup]
//! listen = "10.1.0.2:7700"         # --listen
//! join = "10.1.0.1:7800"           # --join
//! join_listen = "10.1.0.2:7800"    # --join-listen
//! ```
//!
//! Rules:
//! - A flag given on the command line overrides the file (clap tells which
//!   values came from the command line; defaults do not override).
//! - An unknown key or section, a value of the wrong type, an unknown
//!   transport, a malformed arbiter, a zero timeout, or a key meant for the
//!   other role is refused with the key's name and its line and column
//!   (toml's spans).
//! - `--supersede-generation` is not a file setting on purpose: it is the
//!   operator's one-off word that a pair is gone for good, and a unit that
//!   restarts with it would be exactly the same-id takeover it guards.
//! - `lockstep config check FILE` parses and validates the file (key files
//!   readable and long enough, the guest known) without starting anything.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use replica::keys;

pub mod overrides;

/// Errors of a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds a key or value lockstep refuses
    /// (toml's message names the key, its line and column).
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value parsed but does not make sense here.
    #[error("config file {path}, line {line}, column {column}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A key file named by the config is unusable.
    #[error("config file {path}, line {line}, column {column}: `{key}`")]
    Key {
        path: PathBuf,
        key: String,
        line: usize,
        column: usize,
        #[source]
        source: keys::KeyError,
    },
}

/// Which command a file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
        }
    }
}

/// A whole config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub role: Option<Spanned<Role>>,
    pub metrics: Option<Spanned<String>>,
    #[serde(default)]
    pub replica: ReplicaSection,
    #[serde(default)]
    pub arbiter: ArbiterSection,
    #[serde(default)]
    pub guest: GuestSection,
    pub primary: Option<Spanned<PrimarySection>>,
    pub backup: Option<Spanned<BackupSection>>,
}

/// `[replica]`: the flags both roles take (`FtArgs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSection {
    pub id: Option<Spanned<String>>,
    pub vm_id: Option<u64>,
    pub arbiter: Option<Spanned<Arbiter>>,
    pub arbiter_key: Option<Spanned<PathBuf>>,
    pub link_key: Option<Spanned<PathBuf>>,
    pub transport: Option<Transport>,
    pub heartbeat_ms: Option<PositiveMs>,
    pub peer_timeout_ms: Option<PositiveMs>,
    pub status_dir: Option<PathBuf>,
}

/// `[arbiter]`: how a replica reaches an etcd arbiter over TLS and logs
/// in (both roles; the flags `--etcd-*`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArbiterSection {
    pub ca: Option<Spanned<PathBuf>>,
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
    pub user: Option<Spanned<String>>,
    pub password_file: Option<Spanned<PathBuf>>,
}

impl ArbiterSection {
    /// The etcd client's settings.
    pub fn security(&self) -> arbiter::EtcdSecurity {
        let path = |p: &Option<Spanned<PathBuf>>| p.as_ref().map(|p| p.get_ref().clone());
        arbiter::EtcdSecurity {
            ca: path(&self.ca),
            cert: path(&self.cert),
            key: path(&self.key),
            user: self.user.as_ref().map(|u| u.get_ref().clone()),
            password_file: path(&self.password_file),
        }
    }

    /// The span of the first key set, for errors about the section.
    fn first_span(&self) -> Option<std::ops::Range<usize>> {
        [&self.ca, &self.cert, &self.key, &self.password_file]
            .into_iter()
            .flatten()
            .map(Spanned::span)
            .chain(self.user.as_ref().map(Spanned::span))
            .min_by_key(|span| span.start)
    }
}

/// `[guest]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSection {
    pub name: Option<Spanned<String>>,
    pub mem_mib: Option<Spanned<u64>>,
    pub arg: Option<Spanned<u64>>,
    pub input: Option<Spanned<PathBuf>>,
    pub allow_rdtsc: Option<Spanned<bool>>,
    pub digest_interval: Option<Spanned<u64>>,
    pub tap: Option<String>,
    pub quiet: Option<bool>,
}

/// `[primary]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrimarySection {
    pub backup: Option<String>,
    pub backup_id: Option<String>,
    pub join_listen: Option<String>,
    pub stats: Option<PathBuf>,
}

/// `[backup]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    pub listen: Option<String>,
    pub join: Option<String>,
    pub join_listen: Option<String>,
}

/// A transport name, checked while parsing (so the error has its span).
#[derive(Clone, Copy, Debug)]
pub struct Transport(pub replica::link::TransportKind);

impl<'de> Deserialize<'de> for Transport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map(Transport)
            .map_err(serde::de::Error::custom)
    }
}

/// A timeout in milliseconds, at least 1.
#[derive(Clone, Copy, Debug)]
pub struct PositiveMs(pub u64);

impl<'de> Deserialize<'de> for PositiveMs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            0 => Err(serde::de::Error::custom(
                "a timeout of 0 ms would declare every peer lost at once (say at least 1)",
            )),
            ms => Ok(PositiveMs(ms)),
        }
    }
}

/// An arbiter address: `HOST:PORT` of `lockstep arbiter`, or
/// `etcd://HOST:PORT[,HOST:PORT…]`, checked while parsing.
#[derive(Clone, Debug)]
pub struct Arbiter(pub String);

impl<'de> Deserialize<'de> for Arbiter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        check_arbiter(&text).map_err(serde::de::Error::custom)?;
        Ok(Arbiter(text))
    }
}

/// Whether `address` has the form `HOST:PORT` with a numeric port.
fn host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

fn check_arbiter(text: &str) -> Result<(), String> {
    if let Some(endpoints) = text
        .strip_prefix("etcd://")
        .or_else(|| text.strip_prefix("etcds://"))
    {
        for endpoint in endpoints.split(',') {
            if !host_port(endpoint) {
                return Err(format!(
                    "etcd endpoint `{endpoint}` is not HOST:PORT (say etcd://HOST:PORT[,HOST:PORT…])"
                ));
            }
        }
        return Ok(());
    }
    if text.contains("://") {
        return Err(format!(
            "`{text}`: unknown scheme (say HOST:PORT for `lockstep arbiter`, or etcd://HOST:PORT[,…], or etcds://HOST:PORT[,…] for TLS)"
        ));
    }
    if !host_port(text) {
        return Err(format!(
            "`{text}` is not HOST:PORT (or etcd://HOST:PORT[,…])"
        ));
    }
    Ok(())
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |n| before.len() - n - 1)
        + 1;
    (line, column)
}

/// The dotted name of the key whose value is at byte `offset` (its
/// `[section]` and the name before `=` on that line), when the line is a
/// `key = value` line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |n| n + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |n| offset + n);
    let (name, _) = text[start..end].split_once('=')?;
    let name = name.trim().trim_matches('"');
    if name.is_empty() || name.starts_with('[') {
        return None;
    }
    let section = text[..start].lines().rev().find_map(|line| {
        let line = line.trim();
        line.strip_prefix('[')
            .and_then(|rest| rest.split(']').next())
            .map(|section| section.trim_matches(|c| c == '[' || c == ' ').to_string())
    });
    Some(match section {
        Some(section) => format!("{section}.{name}"),
        None => name.to_string(),
    })
}

/// A loaded config file and where it came from (for errors with lines).
pub struct Loaded {
    pub path: PathBuf,
    text: String,
    pub file: ConfigFile,
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, text)
}

/// Parses `text` (read from `path`).
pub fn parse(path: &Path, text: String) -> Result<Loaded, ConfigError> {
    let file: ConfigFile = toml::from_str(&text).map_err(|error| {
        // toml's message has the line, the column and the offending key;
        // keep it on one line per part.
        let message = match error.span() {
            Some(span) => {
                let (line, column) = line_column(&text, span.start);
                let key = key_at(&text, span.start)
                    .map(|key| format!("`{key}`: "))
                    .unwrap_or_default();
                format!(
                    "line {line}, column {column}: {key}{}",
                    error.message().trim_end()
                )
            }
            None => error.message().trim_end().to_string(),
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        }
    })?;
    Ok(Loaded {
        path: path.to_path_buf(),
        text,
        file,
    })
}

impl Loaded {
    fn invalid(&self, key: &str, span: std::ops::Range<usize>, message: String) -> ConfigError {
        let (line, column) = line_column(&self.text, span.start);
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            line,
            column,
            message,
        }
    }

    /// Checks the file is one for `role`: its `role` (if given) matches,
    /// and it holds no section or key only the other role takes.
    pub fn check_role(&self, role: Role) -> Result<(), ConfigError> {
        let file = &self.file;
        if let Some(given) = &file.role
            && *given.get_ref() != role
        {
            return Err(self.invalid(
                "role",
                given.span(),
                format!(
                    "this file is for `lockstep {}`, not `lockstep {}`",
                    given.get_ref().name(),
                    role.name()
                ),
            ));
        }
        match role {
            Role::Primary => {
                if let Some(section) = &file.backup {
                    return Err(self.invalid(
                        "backup",
                        section.span(),
                        "a [backup] section in a primary's file (one file per replica)".into(),
                    ));
                }
            }
            Role::Backup => {
                if let Some(section) = &file.primary {
                    return Err(self.invalid(
                        "primary",
                        section.span(),
                        "a [primary] section in a backup's file (one file per replica)".into(),
                    ));
                }
                let guest = &file.guest;
                let primary_only = [
                    ("guest.name", guest.name.as_ref().map(Spanned::span)),
                    ("guest.mem_mib", guest.mem_mib.as_ref().map(Spanned::span)),
                    ("guest.arg", guest.arg.as_ref().map(Spanned::span)),
                    ("guest.input", guest.input.as_ref().map(Spanned::span)),
                    (
                        "guest.allow_rdtsc",
                        guest.allow_rdtsc.as_ref().map(Spanned::span),
                    ),
                    (
                        "guest.digest_interval",
                        guest.digest_interval.as_ref().map(Spanned::span),
                    ),
                ];
                if let Some((key, Some(span))) =
                    primary_only.into_iter().find(|(_, span)| span.is_some())
                {
                    return Err(self.invalid(
                        key,
                        span,
                        "only a primary's file sets this: a backup runs the guest its primary names"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deeper checks than parsing, for `lockstep config check`: the key
    /// files exist and hold a long enough key, the guest is known, the
    /// metrics address is HOST:PORT.
    pub fn validate(&self) -> Result<Role, ConfigError> {
        let role = self
            .file
            .role
            .as_ref()
            .map(|r| *r.get_ref())
            .ok_or_else(|| ConfigError::Parse {
                path: self.path.clone(),
                message: "no `role` (say role = \"primary\" or role = \"backup\" at the top)"
                    .into(),
            })?;
        self.check_role(role)?;
        let replica = &self.file.replica;
        for (key, path) in [
            ("replica.arbiter_key", &replica.arbiter_key),
            ("replica.link_key", &replica.link_key),
        ] {
            if let Some(path) = path {
                crate::keys::read(path.get_ref(), key).map_err(|source| {
                    let (line, column) = line_column(&self.text, path.span().start);
                    ConfigError::Key {
                        path: self.path.clone(),
                        key: key.to_string(),
                        line,
                        column,
                        source,
                    }
                })?;
            }
        }
        if replica.link_key.is_none() && replica.arbiter_key.is_none() {
            return Err(ConfigError::Parse {
                path: self.path.clone(),
                message: "[replica] names no key: set link_key (or arbiter_key) to a file made by `lockstep keygen FILE`".into(),
            });
        }
        let etcd = replica.arbiter.as_ref().is_some_and(|a| {
            a.get_ref().0.starts_with("etcd://") || a.get_ref().0.starts_with("etcds://")
        });
        let security = self.file.arbiter.security();
        if let Some(span) = self.file.arbiter.first_span()
            && !etcd
        {
            return Err(self.invalid(
                "arbiter",
                span,
                "[arbiter] sets an etcd client's TLS and login, but replica.arbiter is no etcd:// or etcds:// URL".into(),
            ));
        }
        if etcd && let Some(arbiter) = &replica.arbiter {
            // Reads the CA, certificate, key and password files as a
            // replica would (and checks the password file's mode).
            arbiter::EtcdArbiter::from_url(
                &arbiter.get_ref().0,
                &security,
                std::time::Duration::from_secs(1),
            )
            .map_err(|e| {
                let span = self
                    .file
                    .arbiter
                    .first_span()
                    .unwrap_or_else(|| arbiter.span());
                self.invalid("arbiter", span, arbiter::error_chain(&e))
            })?;
        }
        if let Some(arbiter) = &replica.arbiter
            && !etcd
            && replica.arbiter_key.is_none()
        {
            return Err(self.invalid(
                "replica.arbiter",
                arbiter.span(),
                "`lockstep arbiter` needs replica.arbiter_key too".into(),
            ));
        }
        if let Some(id) = &replica.id {
            arbiter::ReplicaId::new(id.get_ref().clone())
                .map_err(|e| self.invalid("replica.id", id.span(), e.to_string()))?;
        }
        if let Some(name) = &self.file.guest.name {
            guest_images::choice::GuestImage::resolve(name.get_ref())
                .map_err(|e| self.invalid("guest.name", name.span(), e.to_string()))?;
        }
        if let Some(address) = &self.file.metrics
            && !host_port(address.get_ref())
        {
            return Err(self.invalid(
                "metrics",
                address.span(),
                format!("`{}` is not HOST:PORT", address.get_ref()),
            ));
        }
        if let Some(input) = &self.file.guest.input
            && let Err(error) = std::fs::metadata(input.get_ref())
        {
            return Err(self.invalid(
                "guest.input",
                input.span(),
                format!("{}: {error}", input.get_ref().display()),
            ));
        }
        Ok(role)
    }
}

/// A primary's config file using every setting (the key file need not
/// exist: [`parse`] and [`Loaded::check_role`] accept it, [`Loaded::validate`]
/// does not), for tests of the file and of how flags override it.
#[doc(hidden)]
pub const EXAMPLE_PRIMARY: &str = r#"role = "primary"
metrics = "127.0.0.1:9400"

[replica]
id = "host-a"
vm_id = 7
arbiter = "etcd://10.0.0.5:2379,10.0.0.6:2379"
link_key = "/etc/lockstep/link.key"
transport = "shm"
peer_timeout_ms = 800
status_dir = "/run/x"

[guest]
name = "net"
mem_mib = 32
arg = 5
tap = "tap0"
quiet = true
digest_interval = 50

[primary]
backup = "10.1.0.2:7700"
backup_id = "host-b"
join_listen = "10.1.0.1:7800"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Loaded, ConfigError> {
        parse(Path::new("test.toml"), text.to_string())
    }

    fn message(result: Result<Loaded, ConfigError>) -> String {
        match result {
            Ok(_) => panic!("accepted"),
            Err(error) => error.to_string(),
        }
    }

    use crate::EXAMPLE_PRIMARY as FULL;

    #[test]
    fn a_full_file_parses() {
        let loaded = parsed(FULL).expect("parses");
        let file = &loaded.file;
        assert_eq!(
            file.role.as_ref().map(|r| *r.get_ref()),
            Some(Role::Primary)
        );
        assert_eq!(file.replica.vm_id, Some(7));
        assert_eq!(file.replica.peer_timeout_ms.map(|t| t.0), Some(800));
        assert_eq!(
            file.replica.transport.map(|t| t.0),
            Some(replica::link::TransportKind::Shm)
        );
        assert_eq!(file.guest.mem_mib.as_ref().map(|m| *m.get_ref()), Some(32));
        let primary = file.primary.as_ref().expect("[primary]").get_ref();
        assert_eq!(primary.backup_id.as_deref(), Some("host-b"));
        loaded.check_role(Role::Primary).expect("a primary's file");
        let wrong = loaded.check_role(Role::Backup).expect_err("not a backup's");
        assert!(
            wrong.to_string().contains("line 1") && wrong.to_string().contains("`role`"),
            "{wrong}"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name_and_line() {
        let text = "role = \"backup\"\n[replica]\nid = \"b\"\npeer_timout_ms = 5\n";
        let error = message(parsed(text));
        assert!(error.contains("peer_timout_ms"), "{error}");
        assert!(error.contains("line 4"), "{error}");
        assert!(error.contains("test.toml"), "{error}");
    }

    #[test]
    fn an_unknown_section_is_refused() {
        let error = message(parsed("[replicas]\nid = \"a\"\n"));
        assert!(
            error.contains("replicas") && error.contains("line 1"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_line() {
        let cases = [
            ("[replica]\n\ntransport = \"udp\"\n", "line 3", "udp"),
            ("[replica]\npeer_timeout_ms = 0\n", "line 2", "0 ms"),
            (
                "[replica]\npeer_timeout_ms = \"fast\"\n",
                "line 2",
                "`replica.peer_timeout_ms`: invalid type",
            ),
            ("[guest]\nmem_mib = -4\n", "line 2", "`guest.mem_mib`"),
            (
                "[replica]\nvm_id = 1\n[guest]\nquiet = 3\n",
                "line 4",
                "`guest.quiet`",
            ),
            (
                "[replica]\narbiter = \"http://x:1\"\n",
                "line 2",
                "unknown scheme",
            ),
            ("[replica]\narbiter = \"etcd://a:1,b\"\n", "line 2", "`b`"),
            ("[replica]\narbiter = \"nohost\"\n", "line 2", "HOST:PORT"),
            ("[replica]\narbiter = \"etcds://a:1,b\"\n", "line 2", "`b`"),
            ("[arbiter]\ncafile = \"x\"\n", "line 2", "cafile"),
            ("role = \"witness\"\n", "line 1", "witness"),
            ("[guest]\nquiet = yes\n", "line 2", ""),
        ];
        for (text, line, what) in cases {
            let error = message(parsed(text));
            assert!(
                error.contains(line) && error.contains(what),
                "{text:?}: {error}"
            );
        }
    }

    #[test]
    fn a_backup_file_refuses_primary_settings() {
        let text = "role = \"backup\"\n[guest]\ntap = \"tap0\"\nmem_mib = 8\n";
        let error = parsed(text)
            .expect("parses")
            .check_role(Role::Backup)
            .expect_err("refused");
        let error = error.to_string();
        assert!(
            error.contains("guest.mem_mib") && error.contains("line 4"),
            "{error}"
        );
        let text = "[primary]\nbackup = \"x:1\"\n";
        let error = parsed(text)
            .expect("parses")
            .check_role(Role::Backup)
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("[primary]") && error.contains("line 1"),
            "{error}"
        );
    }

    #[test]
    fn validate_reads_the_key_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short.key");
        std::fs::write(&short, "abc\n").expect("write");
        let text = format!(
            "role = \"backup\"\n[replica]\nlink_key = \"{}\"\n",
            short.display()
        );
        let error = parsed(&text)
            .expect("parses")
            .validate()
            .expect_err("short key");
        let error = error.to_string();
        assert!(
            error.contains("replica.link_key") && error.contains("line 3"),
            "{error}"
        );
        let good = dir.path().join("good.key");
        crate::keys::generate(&good).expect("keygen");
        let text = format!(
            "role = \"backup\"\n[replica]\nlink_key = \"{}\"\n",
            good.display()
        );
        assert_eq!(
            parsed(&text).expect("parses").validate().expect("valid"),
            Role::Backup
        );
        let error = parsed("role = \"backup\"\n")
            .expect("parses")
            .validate()
            .expect_err("no key");
        assert!(error.to_string().contains("keygen"), "{error}");
    }

    #[test]
    fn validate_checks_the_arbiter_section_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("link.key");
        crate::keys::generate(&key).expect("keygen");
        let password = dir.path().join("etcd.password");
        std::fs::write(&password, "pw\n").expect("write");
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let file = |arbiter: &str, section: &str| {
            format!(
                "role = \"backup\"\n[replica]\nlink_key = \"{}\"\narbiter = \"{arbiter}\"\n[arbiter]\n{section}",
                key.display()
            )
        };
        let cases = [
            (
                file(
                    "etcd://a:1",
                    &format!("user = \"u\"\npassword_file = \"{}\"\n", password.display()),
                ),
                vec!["line 6", "`arbiter`", "chmod 600"],
            ),
            (
                file("etcds://a:1", "ca = \"/nonexistent/ca.crt\"\n"),
                vec!["line 6", "/nonexistent/ca.crt"],
            ),
            (file("etcds://a:1", ""), vec!["CA"]),
            (
                file("10.0.0.1:7000", "user = \"u\"\n"),
                vec!["line 6", "no etcd:// or etcds://"],
            ),
        ];
        for (text, expected) in cases {
            let error = parsed(&text)
                .expect("parses")
                .validate()
                .expect_err("refused")
                .to_string();
            for what in expected {
                assert!(error.contains(what), "{text}: no {what:?} in {error}");
            }
        }
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let good = file(
            "etcd://a:1",
            &format!("user = \"u\"\npassword_file = \"{}\"\n", password.display()),
        );
        assert_eq!(
            parsed(&good).expect("parses").validate().expect("valid"),
            Role::Backup
        );
    }
}
