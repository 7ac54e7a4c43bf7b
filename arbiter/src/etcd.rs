//! The etcd backend: the arbiter for production, where the authority must
//! itself be replicated (etcd is a Raft cluster; a majority of its members
//! decides, so losing one arbiter host no longer stalls failover).
//!
//! It speaks etcd's v3 API through its JSON gateway (`POST /v3/kv/range` and
//! `POST /v3/kv/txn`, keys and values in base64) with `ureq`, a maintained
//! blocking HTTP/1.1 client (no gRPC stack, no async runtime), every call
//! bounded by its deadline and every answer by [`MAX_RESPONSE`] (1 MiB).
//! Tested against etcd 3.4 (Debian's `etcd-server`).
//!
//! [`parse_http_response`] is the hand-written decoder this replaced (a
//! chunk size of `ffffffffffffffff` once overflowed it, issue 13 item 9);
//! it is no longer on any call path and stays, bounded and tested, only as
//! the `etcd_response` fuzz target's entry point until that target moves
//! to the JSON layer ([`parse_kvs`]).
//!
//! # Layout in etcd
//!
//! One key per VM, `<prefix>/vm/<vm id in decimal>` (prefix
//! [`DEFAULT_PREFIX`] unless set), whose value is the record as text:
//!
//! ```text
//! lockstep-arbiter-v1 <generation> <primary> [<backup>]
//! ```
//!
//! (replica ids contain no spaces, see [`ReplicaId`]), so `etcdctl get
//! --prefix /lockstep/arbiter` shows the state as it is.
//!
//! # The compare-and-set
//!
//! A call reads the key, applies the same decision as every backend
//! ([`crate::model`]) and, for a grant, sends one transaction:
//!
//! ```text
//! compare: mod_revision(key) == the revision read   (version(key) == 0 if absent)
//! success: put(key, new record)
//! failure: range(key)                               (the record that won instead)
//! ```
//!
//! `mod_revision` is the cluster-wide revision of the key's last change; it
//! only grows, so unlike the value or the per-key version it can never come
//! back to an old number (no ABA). If the compare fails, the record changed
//! since it was read: the decision is taken again on the record returned by
//! the failure branch, which loses unless the change was irrelevant.
//! Exactly one transaction per `(vm, generation)` can succeed.
//!
//! # TLS and authentication
//!
//! `etcds://HOST:PORT[,…]` ([`EtcdArbiter::from_url`]) speaks HTTPS
//! (rustls through ureq, no OpenSSL) and checks each member's certificate
//! against the CA in [`EtcdSecurity::ca`] only (not the host's roots); the
//! member's certificate must name the endpoint's host (an IP address
//! endpoint needs an IP SAN). With [`EtcdSecurity::cert`] and
//! [`EtcdSecurity::key`] the client proves itself with a certificate (etcd's
//! `--client-cert-auth`). With [`EtcdSecurity::user`] and
//! [`EtcdSecurity::password_file`] it logs in as an etcd user (etcd v3
//! auth) before its first call on each member:
//!
//! ```text
//! client                                   etcd member
//!   │ POST /v3/auth/authenticate              │
//!   │   {"name": user, "password": …} ───────▶│
//!   │◀─────────────────── {"token": T} ───────│  (wrong password: HTTP 4xx,
//!   │ POST /v3/kv/range                       │   EtcdError::Auth, not retried)
//!   │   Authorization: T, {…} ───────────────▶│
//!   │◀──────────── 401 "invalid auth token" ──│  (T expired: etcd's
//!   │ POST /v3/auth/authenticate … (again)    │   --auth-token-ttl)
//!   │ POST /v3/kv/range, Authorization: T' ──▶│  one retry with the new token
//! ```
//!
//! Tokens are kept per member (etcd's simple tokens are), and every step,
//! the log-in included, ends by the call's deadline. The password is read
//! from a file, once, when the arbiter is made; the file must not be
//! readable by group or others (never on a command line, where `ps` shows
//! it). A TLS failure (unknown CA, a refused client certificate) is
//! [`EtcdError::Tls`], naming the endpoint; like every error it is never a
//! win.
//!
//! # Not covered
//!
//! Deleting the key by hand resets the VM's generations: never do it while
//! any replica of the VM runs.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::client::remaining;
use crate::model::{
    Decision, Outcome, ReplicaId, RequestError, VmId, VmRecord, decide_register,
    decide_test_and_set,
};
use crate::{Arbiter, ArbiterError};

/// The key prefix used unless [`EtcdArbiter::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "/lockstep/arbiter";
/// The largest HTTP response accepted.
const MAX_RESPONSE: usize = 1 << 20;
const VALUE_TAG: &str = "lockstep-arbiter-v1";

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint was configured or an endpoint is unusable.
    #[error("bad etcd endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: &'static str,
    },
    /// Connecting, writing or reading failed.
    #[error("cannot talk to etcd at {endpoint}")]
    Io {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The call's deadline passed.
    #[error("etcd did not answer within {timeout:?}")]
    Timeout {
        /// The bound.
        timeout: Duration,
    },
    /// etcd answered with an HTTP error.
    #[error("etcd at {endpoint} answered HTTP {status}: {body}")]
    Http {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body (etcd's error message).
        body: String,
    },
    /// etcd's answer could not be understood.
    #[error("unexpected answer from etcd at {endpoint}: {reason}")]
    BadResponse {
        /// The endpoint.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// A TLS handshake with a member failed (its certificate is not signed
    /// by the CA given, or it refused our client certificate).
    #[error("TLS with etcd at {endpoint} failed (check the CA, client certificate and key)")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// etcd refused the user name or password.
    #[error("etcd at {endpoint} refused user {user:?}: HTTP {status}: {body}")]
    Auth {
        /// The endpoint.
        endpoint: String,
        /// The etcd user.
        user: String,
        /// The HTTP status.
        status: u16,
        /// etcd's message.
        body: String,
    },
    /// A TLS or password file cannot be used.
    #[error("etcd {what} {}: {reason}", path.display())]
    File {
        /// Which setting (`CA`, `client certificate`, …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The stored value is not a record this crate wrote.
    #[error("the etcd key {key} does not hold an arbiter record: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl EtcdError {
    /// Whether no etcd member could be reached in time.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, EtcdError::Io { .. } | EtcdError::Timeout { .. })
    }
}

/// How a client proves itself to etcd and checks etcd's members: TLS
/// files (PEM) and an etcd user. All optional; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// The CA that signed the members' certificates (required for
    /// `etcds://`).
    pub ca: Option<PathBuf>,
    /// This client's certificate (chain), for `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// The private key of [`EtcdSecurity::cert`].
    pub key: Option<PathBuf>,
    /// The etcd user to log in as.
    pub user: Option<String>,
    /// A file holding that user's password (its first line), mode 0600 or
    /// stricter.
    pub password_file: Option<PathBuf>,
}

impl EtcdSecurity {
    /// Whether any setting is given.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none()
            && self.cert.is_none()
            && self.key.is_none()
            && self.user.is_none()
            && self.password_file.is_none()
    }
}

/// An etcd user and password, and the tokens issued to it by each member.
#[derive(Clone)]
struct Login {
    user: String,
    password: String,
    /// One slot per endpoint.
    tokens: Arc<Mutex<Vec<Option<String>>>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// An [`Arbiter`] whose records live in an etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdArbiter {
    agent: ureq::Agent,
    /// `http` or `https`.
    scheme: &'static str,
    endpoints: Vec<String>,
    login: Option<Login>,
    prefix: String,
    timeout: Duration,
}

fn file_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> ArbiterError {
    ArbiterError::Etcd {
        endpoints: String::new(),
        source: Box::new(EtcdError::File {
            what,
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }),
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ArbiterError> {
    std::fs::read(path).map_err(|e| file_error(what, path, e))
}

/// The TLS settings of the agent: only `ca` as roots, and the client
/// certificate if given.
fn tls_config(security: &EtcdSecurity) -> Result<ureq::tls::TlsConfig, ArbiterError> {
    use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
    let ca_path = security.ca.as_deref().ok_or_else(|| ArbiterError::Etcd {
        endpoints: String::new(),
        source: Box::new(EtcdError::Endpoint {
            endpoint: "etcds://".into(),
            reason: "etcds:// needs the CA that signed the members' certificates (--etcd-ca FILE, or `ca` in [arbiter])",
        }),
    })?;
    let certs =
        |what: &'static str, path: &Path| -> Result<Vec<Certificate<'static>>, ArbiterError> {
            let pem = read_file(what, path)?;
            let mut out = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                match item.map_err(|e| file_error(what, path, e))? {
                    PemItem::Certificate(c) => out.push(c),
                    _ => continue,
                }
            }
            if out.is_empty() {
                return Err(file_error(what, path, "holds no PEM certificate"));
            }
            Ok(out)
        };
    let roots = certs("CA", ca_path)?;
    let mut builder = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&roots));
    match (&security.cert, &security.key) {
        (Some(cert), Some(key)) => {
            let chain = certs("client certificate", cert)?;
            let pem = read_file("client key", key)?;
            let key = PrivateKey::from_pem(&pem).map_err(|e| file_error("client key", key, e))?;
            builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        (None, None) => {}
        (Some(path), None) | (None, Some(path)) => {
            return Err(file_error(
                "client certificate or key",
                path,
                "a client certificate needs its key and a key its certificate (give both)",
            ));
        }
    }
    Ok(builder.build())
}

/// The password in `path` (its first line), refused when group or others
/// may read the file.
fn read_password(path: &Path) -> Result<String, ArbiterError> {
    let meta = std::fs::metadata(path).map_err(|e| file_error("password file", path, e))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(file_error(
            "password file",
            path,
            format!(
                "can be read by other users (mode {:o}); chmod 600 it",
                mode & 0o777
            ),
        ));
    }
    let bytes = read_file("password file", path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| file_error("password file", path, "not UTF-8"))?;
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        return Err(file_error("password file", path, "is empty"));
    }
    Ok(password)
}

impl EtcdArbiter {
    /// An arbiter on the etcd cluster whose client URLs are `endpoints`
    /// (`host:port` or `http://host:port`; tried in order within one call's
    /// timeout, so list every member), in plain HTTP without a login.
    /// Contacts nobody yet.
    pub fn new<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, ArbiterError> {
        Self::build("http", endpoints, &EtcdSecurity::default(), timeout)
    }

    /// An arbiter from an `--arbiter` URL: `etcd://HOST:PORT[,HOST:PORT…]`
    /// (HTTP) or `etcds://HOST:PORT[,…]` (HTTPS, [`EtcdSecurity::ca`]
    /// required), with `security`'s client certificate and login. Reads
    /// the files now (an unusable one is an error naming it); contacts
    /// nobody yet.
    pub fn from_url(
        url: &str,
        security: &EtcdSecurity,
        timeout: Duration,
    ) -> Result<Self, ArbiterError> {
        let (scheme, list) = if let Some(list) = url.strip_prefix("etcds://") {
            ("https", list)
        } else if let Some(list) = url.strip_prefix("etcd://") {
            ("http", list)
        } else {
            return Err(ArbiterError::Etcd {
                endpoints: url.to_string(),
                source: Box::new(EtcdError::Endpoint {
                    endpoint: url.to_string(),
                    reason: "expected etcd://HOST:PORT[,…] or etcds://HOST:PORT[,…]",
                }),
            });
        };
        let endpoints: Vec<&str> = list.split(',').collect();
        Self::build(scheme, &endpoints, security, timeout)
    }

    fn build<S: AsRef<str>>(
        scheme: &'static str,
        endpoints: &[S],
        security: &EtcdSecurity,
        timeout: Duration,
    ) -> Result<Self, ArbiterError> {
        let mut list = Vec::new();
        for e in endpoints {
            let e = e.as_ref().trim();
            let host = e
                .strip_prefix(&format!("{scheme}://"))
                .unwrap_or(e)
                .trim_end_matches('/');
            let bad = |reason| ArbiterError::Etcd {
                endpoints: e.to_string(),
                source: Box::new(EtcdError::Endpoint {
                    endpoint: e.to_string(),
                    reason,
                }),
            };
            if host.contains("://") {
                return Err(bad(
                    "a client URL of the other scheme (say etcd:// for http, etcds:// for https)",
                ));
            }
            if host.is_empty() || host.contains('/') {
                return Err(bad("expected host:port or http://host:port"));
            }
            list.push(host.to_string());
        }
        if list.is_empty() {
            return Err(ArbiterError::Etcd {
                endpoints: String::new(),
                source: Box::new(EtcdError::Endpoint {
                    endpoint: String::new(),
                    reason: "no endpoint given",
                }),
            });
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0);
        if scheme == "https" {
            config = config.tls_config(tls_config(security)?);
        } else if security.ca.is_some() || security.cert.is_some() || security.key.is_some() {
            return Err(ArbiterError::Etcd {
                endpoints: list.join(","),
                source: Box::new(EtcdError::Endpoint {
                    endpoint: list.join(","),
                    reason: "TLS files given for a plain etcd:// arbiter (say etcds://)",
                }),
            });
        }
        let login = match (&security.user, &security.password_file) {
            (Some(user), Some(path)) => Some(Login {
                user: user.clone(),
                password: read_password(path)?,
                tokens: Arc::new(Mutex::new(vec![None; list.len()])),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ArbiterError::Etcd {
                    endpoints: list.join(","),
                    source: Box::new(EtcdError::Endpoint {
                        endpoint: list.join(","),
                        reason: "an etcd user needs its password file (--etcd-password-file FILE, or `password_file` in [arbiter])",
                    }),
                });
            }
            (None, Some(path)) => {
                return Err(file_error(
                    "password file",
                    path,
                    "a password without a user (--etcd-user NAME, or `user` in [arbiter])",
                ));
            }
        };
        Ok(Self {
            agent: config.build().new_agent(),
            scheme,
            endpoints: list,
            login,
            prefix: DEFAULT_PREFIX.to_string(),
            timeout,
        })
    }

    /// Keeps the records under `prefix` instead of [`DEFAULT_PREFIX`] (e.g.
    /// one prefix per test, or per deployment sharing a cluster).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().trim_end_matches('/').to_string();
        self
    }

    /// The etcd key holding `vm`'s record.
    pub fn key(&self, vm: VmId) -> String {
        format!("{}/vm/{vm}", self.prefix)
    }

    fn wrap(&self, source: EtcdError) -> ArbiterError {
        ArbiterError::Etcd {
            endpoints: self.endpoints.join(","),
            source: Box::new(source),
        }
    }

    /// The cached token of endpoint `i`, or a new one from a log-in.
    fn token(&self, login: &Login, i: usize, until: Instant) -> Result<String, EtcdError> {
        let cached = login
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .cloned()
            .flatten();
        if let Some(token) = cached {
            return Ok(token);
        }
        let endpoint = &self.endpoints[i];
        let body = json!({"name": login.user, "password": login.password}).to_string();
        let (status, response) = http_post(
            &self.agent,
            self.scheme,
            endpoint,
            "/v3/auth/authenticate",
            &body,
            None,
            until,
        )
        .map_err(|e| self.io_error(endpoint, e))?;
        if status != 200 {
            let text = snippet(&response);
            // A member without quorum fails the log-in too: that is not a
            // refusal of the password, so the next member is tried.
            if text.contains("authentication failed") || text.contains("invalid user") {
                return Err(EtcdError::Auth {
                    endpoint: endpoint.clone(),
                    user: login.user.clone(),
                    status,
                    body: text,
                });
            }
            return Err(EtcdError::Http {
                endpoint: endpoint.clone(),
                status,
                body: text,
            });
        }
        let token = serde_json::from_slice::<Value>(&response)
            .ok()
            .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_string))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| EtcdError::BadResponse {
                endpoint: endpoint.clone(),
                reason: "an authenticate answer without a token".into(),
            })?;
        if let Some(slot) = login
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
        {
            *slot = Some(token.clone());
        }
        Ok(token)
    }

    fn forget_token(&self, login: &Login, i: usize) {
        if let Some(slot) = login
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
        {
            *slot = None;
        }
    }

    /// An I/O error of a call to `endpoint`, classified: a timeout, a TLS
    /// failure (an HTTPS call's `InvalidData`), or unreachable.
    fn io_error(&self, endpoint: &str, source: io::Error) -> EtcdError {
        match source.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => EtcdError::Timeout {
                timeout: self.timeout,
            },
            io::ErrorKind::InvalidData if self.scheme == "https" => EtcdError::Tls {
                endpoint: endpoint.to_string(),
                source,
            },
            _ => EtcdError::Io {
                endpoint: endpoint.to_string(),
                source,
            },
        }
    }

    /// One POST to endpoint `i`, logged in if a user is set: a token etcd
    /// refuses (expired) is replaced by a new log-in, once.
    fn post_one(
        &self,
        i: usize,
        path: &str,
        body: &str,
        until: Instant,
    ) -> Result<(u16, Vec<u8>), EtcdError> {
        let endpoint = &self.endpoints[i];
        let Some(login) = &self.login else {
            return http_post(&self.agent, self.scheme, endpoint, path, body, None, until)
                .map_err(|e| self.io_error(endpoint, e));
        };
        for attempt in 0..2 {
            let token = self.token(login, i, until)?;
            let (status, response) = http_post(
                &self.agent,
                self.scheme,
                endpoint,
                path,
                body,
                Some(&token),
                until,
            )
            .map_err(|e| self.io_error(endpoint, e))?;
            if attempt == 0 && token_refused(status, &response) {
                self.forget_token(login, i);
                continue;
            }
            return Ok((status, response));
        }
        Err(EtcdError::Auth {
            endpoint: endpoint.clone(),
            user: login.user.clone(),
            status: 401,
            body: "a fresh token was refused too".into(),
        })
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    fn post(&self, path: &str, body: &Value, deadline: Instant) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let mut last = EtcdError::Timeout {
            timeout: self.timeout,
        };
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            // Share what is left fairly between the endpoints not yet tried.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(self.endpoints.len() - i).unwrap_or(1);
            let until = Instant::now() + share;
            match self.post_one(i, path, &body, until) {
                Ok((200, response)) => {
                    return serde_json::from_slice(&response).map_err(|e| EtcdError::BadResponse {
                        endpoint: endpoint.clone(),
                        reason: format!("not JSON: {e}"),
                    });
                }
                Ok((status, response)) => {
                    last = EtcdError::Http {
                        endpoint: endpoint.clone(),
                        status,
                        body: snippet(&response),
                    };
                }
                // A refused password is refused by every member.
                Err(error @ EtcdError::Auth { .. }) => return Err(error),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// The record and its `mod_revision`, if the key exists.
    fn range(&self, vm: VmId, deadline: Instant) -> Result<Option<(VmRecord, i64)>, EtcdError> {
        let key = self.key(vm);
        let response = self.post(
            "/v3/kv/range",
            &json!({ "key": BASE64.encode(&key) }),
            deadline,
        )?;
        self.parse_kvs(&key, &response)
    }

    fn parse_kvs(&self, key: &str, response: &Value) -> Result<Option<(VmRecord, i64)>, EtcdError> {
        parse_kvs(&self.endpoints.join(","), key, response)
    }

    /// One compare-and-set transaction. `Ok(None)` when it committed,
    /// `Ok(Some(current))` when the record had changed.
    fn txn(
        &self,
        vm: VmId,
        read_revision: Option<i64>,
        record: &VmRecord,
        deadline: Instant,
    ) -> Result<Option<Option<(VmRecord, i64)>>, EtcdError> {
        let key = self.key(vm);
        let k = BASE64.encode(&key);
        let compare = match read_revision {
            Some(rev) => {
                json!({"key": k, "result": "EQUAL", "target": "MOD", "mod_revision": rev.to_string()})
            }
            None => json!({"key": k, "result": "EQUAL", "target": "VERSION", "version": "0"}),
        };
        let body = json!({
            "compare": [compare],
            "success": [{"request_put": {"key": k, "value": BASE64.encode(format_value(record))}}],
            "failure": [{"request_range": {"key": k}}],
        });
        let response = self.post("/v3/kv/txn", &body, deadline)?;
        // proto3 JSON leaves out false booleans.
        if response
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return Ok(None);
        }
        let range = response
            .get("responses")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .and_then(|r| r.get("response_range").or_else(|| r.get("responseRange")))
            .ok_or_else(|| EtcdError::BadResponse {
                endpoint: self.endpoints.join(","),
                reason: "a failed transaction without its range".to_string(),
            })?;
        Ok(Some(self.parse_kvs(&key, range)?))
    }

    fn compare_and_set(
        &self,
        vm: VmId,
        decide: impl Fn(Option<&VmRecord>) -> Result<Decision, RequestError>,
    ) -> Result<Outcome, ArbiterError> {
        let deadline = Instant::now() + self.timeout;
        let mut current = self.range(vm, deadline).map_err(|e| self.wrap(e))?;
        loop {
            match decide(current.as_ref().map(|(r, _)| r))? {
                Decision::Refuse(reason) => {
                    return Ok(Outcome::Lost {
                        reason,
                        current: current.map(|(r, _)| r),
                    });
                }
                Decision::Already(record) => return Ok(Outcome::Won(record)),
                Decision::Grant(record) => {
                    let revision = current.as_ref().map(|(_, rev)| *rev);
                    match self
                        .txn(vm, revision, &record, deadline)
                        .map_err(|e| self.wrap(e))?
                    {
                        None => return Ok(Outcome::Won(record)),
                        Some(now) => current = now,
                    }
                }
            }
            if remaining(deadline).is_err() {
                return Err(self.wrap(EtcdError::Timeout {
                    timeout: self.timeout,
                }));
            }
        }
    }
}

impl Arbiter for EtcdArbiter {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn read(&self, vm: VmId) -> Result<Option<VmRecord>, ArbiterError> {
        let deadline = Instant::now() + self.timeout;
        Ok(self
            .range(vm, deadline)
            .map_err(|e| self.wrap(e))?
            .map(|(r, _)| r))
    }

    fn test_and_set(
        &self,
        vm: VmId,
        expected: u64,
        candidate: &ReplicaId,
    ) -> Result<Outcome, ArbiterError> {
        self.compare_and_set(vm, |current| {
            decide_test_and_set(current, expected, candidate)
        })
    }

    fn register(
        &self,
        vm: VmId,
        expected: u64,
        primary: &ReplicaId,
        backup: &ReplicaId,
    ) -> Result<Outcome, ArbiterError> {
        decide_register(None, 0, primary, backup)?;
        self.compare_and_set(vm, |current| {
            decide_register(current, expected, primary, backup)
        })
    }
}

/// Decodes the record under `key` and its `mod_revision` from a JSON range
/// response of etcd's v3 gateway (`{"kvs": [{"value": base64, "mod_revision": n}]}`);
/// `Ok(None)` if the key is absent. `endpoint` names the server in errors.
/// Public for the fuzz targets.
pub fn parse_kvs(
    endpoint: &str,
    key: &str,
    response: &Value,
) -> Result<Option<(VmRecord, i64)>, EtcdError> {
    let bad = |reason: &str| EtcdError::BadResponse {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let Some(kvs) = response.get("kvs").and_then(Value::as_array) else {
        return Ok(None);
    };
    let Some(kv) = kvs.first() else {
        return Ok(None);
    };
    let value = kv
        .get("value")
        .and_then(Value::as_str)
        .map(|v| BASE64.decode(v))
        .transpose()
        .map_err(|_| bad("value is not base64"))?
        .unwrap_or_default();
    let revision = kv
        .get("mod_revision")
        .and_then(as_i64)
        .ok_or_else(|| bad("no mod_revision"))?;
    Ok(Some((parse_value(key, &value)?, revision)))
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The text stored in etcd for a record.
pub fn format_value(record: &VmRecord) -> String {
    let mut out = format!("{VALUE_TAG} {} {}", record.generation, record.primary);
    if let Some(b) = &record.backup {
        let _ = write!(out, " {b}");
    }
    out
}

/// Parses [`format_value`]'s text.
pub fn parse_value(key: &str, value: &[u8]) -> Result<VmRecord, EtcdError> {
    let bad = |reason| EtcdError::BadValue {
        key: key.to_string(),
        reason,
    };
    let text = std::str::from_utf8(value).map_err(|_| bad("not UTF-8"))?;
    let mut fields = text.split(' ');
    if fields.next() != Some(VALUE_TAG) {
        return Err(bad("unknown tag"));
    }
    let generation: u64 = fields
        .next()
        .and_then(|g| g.parse().ok())
        .filter(|g| *g > 0)
        .ok_or_else(|| bad("bad generation"))?;
    let primary = fields
        .next()
        .and_then(|p| ReplicaId::new(p).ok())
        .ok_or_else(|| bad("bad primary"))?;
    let backup = fields
        .next()
        .map(|b| ReplicaId::new(b).map_err(|_| bad("bad backup")))
        .transpose()?;
    if fields.next().is_some() {
        return Err(bad("trailing fields"));
    }
    Ok(VmRecord {
        generation,
        primary,
        backup,
    })
}

/// One HTTP/1.1 POST through `agent` (ureq, a maintained client: status
/// line, headers, chunked or sized bodies are its job); returns the status
/// and the body, at most [`MAX_RESPONSE`] bytes. Everything, connect
/// included, ends by `deadline`.
fn http_post(
    agent: &ureq::Agent,
    scheme: &str,
    endpoint: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
    deadline: Instant,
) -> io::Result<(u16, Vec<u8>)> {
    let url = format!("{scheme}://{endpoint}{path}");
    let mut request = agent.post(&url);
    if let Some(token) = token {
        request = request.header("Authorization", token);
    }
    let mut response = request
        .config()
        .timeout_global(Some(remaining(deadline)?))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .header("Content-Type", "application/json")
        // One connection per call, as before: a call retried on another
        // member after a lost reply never rides a half-dead connection.
        .header("Connection", "close")
        .send(body)
        .map_err(from_ureq)?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE as u64)
        .read_to_vec()
        .map_err(from_ureq)?;
    Ok((status, body))
}

/// The start of a body, as text (etcd's error message).
fn snippet(response: &[u8]) -> String {
    String::from_utf8_lossy(&response[..response.len().min(300)]).into_owned()
}

/// Whether etcd refused the token of a logged-in call (expired, or issued
/// before a restart): the gateway answers 401 for gRPC's Unauthenticated.
fn token_refused(status: u16, response: &[u8]) -> bool {
    let text = snippet(response);
    status == 401
        || (status != 200 && (text.contains("auth token") || text.contains("user name is empty")))
}

/// ureq's error as the I/O error the callers classify (a timeout is
/// `TimedOut`; an oversized or malformed answer is `InvalidData`).
fn from_ureq(error: ureq::Error) -> io::Error {
    match error {
        ureq::Error::Io(error) => error,
        ureq::Error::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, "etcd call timed out"),
        // Not InvalidData: over HTTPS that kind names a TLS failure.
        ureq::Error::BodyExceedsLimit(_) => {
            io::Error::other(format!("response larger than {MAX_RESPONSE} bytes"))
        }
        ureq::Error::ConnectionFailed => {
            io::Error::new(io::ErrorKind::ConnectionRefused, "connection failed")
        }
        ureq::Error::HostNotFound => {
            io::Error::new(io::ErrorKind::NotFound, "the endpoint resolves to nothing")
        }
        // TLS failures (a certificate not signed by the CA, a refused
        // client certificate) are InvalidData too: an HTTPS caller names
        // them as TLS errors.
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Decodes a whole HTTP/1.1 response (as read until the server closed):
/// its status and its body, de-chunked or cut to its `Content-Length`.
/// Every length in it is bounded by the bytes actually present; anything
/// malformed is an [`io::ErrorKind::InvalidData`] error. Public for the
/// fuzz targets.
pub fn parse_http_response(response: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of HTTP headers"))?;
    let head = std::str::from_utf8(&response[..split])
        .map_err(|_| invalid("HTTP headers are not UTF-8"))?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| invalid("bad HTTP status line"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid("bad Content-Length"))?,
            );
        }
    }
    if chunked {
        return Ok((status, dechunk(body)?));
    }
    match length {
        Some(n) if n > MAX_RESPONSE => Err(invalid("Content-Length larger than accepted")),
        Some(n) if n <= body.len() => Ok((status, body[..n].to_vec())),
        Some(_) => Err(invalid("HTTP body shorter than its Content-Length")),
        None => Ok((status, body.to_vec())),
    }
}

fn dechunk(mut body: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text =
            std::str::from_utf8(&body[..line_end]).map_err(|_| invalid("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        // Every length from the wire is bounded before any arithmetic: a
        // chunk size of ffffffffffffffff once overflowed `size + 2` here.
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        // A response is at most MAX_RESPONSE bytes, so a larger chunk can
        // only be a truncated one.
        if size > MAX_RESPONSE {
            return Err(invalid(
                "truncated chunk (its size is larger than the largest response accepted)",
            ));
        }
        body = body
            .get(line_end + 2..)
            .ok_or_else(|| invalid("truncated chunk"))?;
        if size == 0 {
            return Ok(out);
        }
        let end = size
            .checked_add(2)
            .ok_or_else(|| invalid("truncated chunk (its size overflows)"))?;
        let (chunk, rest) = (body.get(..size), body.get(end..));
        let (Some(chunk), Some(rest)) = (chunk, rest) else {
            return Err(invalid("truncated chunk"));
        };
        out.extend_from_slice(chunk);
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let id = |s: &str| ReplicaId::new(s).expect("id");
        for r in [
            VmRecord {
                generation: 1,
                primary: id("a"),
                backup: Some(id("b")),
            },
            VmRecord {
                generation: u64::MAX,
                primary: id("-"),
                backup: None,
            },
        ] {
            assert_eq!(
                parse_value("k", format_value(&r).as_bytes()).expect("parses"),
                r
            );
        }
        for bad in [
            "",
            "lockstep-arbiter-v1",
            "lockstep-arbiter-v1 0 a",
            "x 1 a",
            "lockstep-arbiter-v1 1 a b c",
        ] {
            assert!(parse_value("k", bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn http_responses() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            parse_http_response(plain).expect("parses"),
            (200, b"{}".to_vec())
        );
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).expect("parses"),
            (503, b"abcde".to_vec())
        );
        assert!(parse_http_response(b"garbage").is_err());
        for hostile in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffe\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000000\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4294967296\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(parse_http_response(hostile).is_err(), "{hostile:?}");
        }
        assert!(
            parse_http_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .is_err()
        );
    }

    /// A fake etcd member on loopback that answers every request with
    /// `reply` (then closes); returns its address.
    fn fake_etcd(reply: Vec<u8>) -> String {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(&reply);
            }
        });
        address
    }

    #[test]
    fn hostile_etcd_answers_are_errors_through_the_client() {
        let mut huge = b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n".to_vec();
        huge.resize(huge.len() + 2_000_000, b' ');
        let mut huge_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..40 {
            huge_chunked.extend_from_slice(b"10000\r\n");
            huge_chunked.resize(huge_chunked.len() + 0x10000, b' ');
            huge_chunked.extend_from_slice(b"\r\n");
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("chunk size 2^64-1", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n".to_vec()),
            ("chunk size 2^64-2", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffe\r\n".to_vec()),
            ("Content-Length 2^64-1", b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}".to_vec()),
            ("a body over 1 MiB", huge),
            ("chunks over 1 MiB", huge_chunked),
            ("garbage", b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()),
            ("not JSON", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc".to_vec()),
            ("a redirect", b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ];
        for (what, reply) in cases {
            let address = fake_etcd(reply);
            let etcd = EtcdArbiter::new(&[address.as_str()], Duration::from_secs(3)).expect("etcd");
            let started = Instant::now();
            let error = etcd.read(1).expect_err(what);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what}: too slow"
            );
            let _ = crate::error_chain(&error);
        }
        // A well-formed empty range is "no record", through the same path.
        let ok =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec();
        let etcd =
            EtcdArbiter::new(&[fake_etcd(ok).as_str()], Duration::from_secs(3)).expect("etcd");
        assert_eq!(etcd.read(1).expect("an empty range"), None);
    }

    #[test]
    fn chunk_sizes_near_usize_max_are_truncated_chunks_not_overflows() {
        // Regression (issue 13, and fuzz target `etcd_response`): size + 2
        // overflowed for a chunk size of 2^64 - 1 or 2^64 - 2.
        for size in ["ffffffffffffffff", "fffffffffffffffe", "7fffffffffffffff"] {
            let response = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
            );
            let error = parse_http_response(response.as_bytes()).expect_err(size);
            assert!(
                error.to_string().contains("truncated chunk"),
                "{size}: {error}"
            );
        }
        // A chunk exactly as long as what is left, less its CRLF.
        let short = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc";
        assert!(parse_http_response(short).is_err());
        let exact = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(exact).expect("parses"),
            (200, b"abc".to_vec())
        );
    }
}
