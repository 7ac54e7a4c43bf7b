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
//! # Not covered
//!
//! Plain HTTP only: no TLS (`etcds://`), no etcd user authentication yet
//! (ureq is built without its TLS features for now). Run etcd on a network
//! only the replicas reach.
//! Deleting the key by hand resets the VM's generations: never do it while
//! any replica of the VM runs.

use std::fmt::Write as _;
use std::io;
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

/// An [`Arbiter`] whose records live in an etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdArbiter {
    agent: ureq::Agent,
    endpoints: Vec<String>,
    prefix: String,
    timeout: Duration,
}

impl EtcdArbiter {
    /// An arbiter on the etcd cluster whose client URLs are `endpoints`
    /// (`host:port` or `http://host:port`; tried in order within one call's
    /// timeout, so list every member). Contacts nobody yet.
    pub fn new<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, ArbiterError> {
        let mut list = Vec::new();
        for e in endpoints {
            let e = e.as_ref().trim();
            let host = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
            let bad = |reason| ArbiterError::Etcd {
                endpoints: e.to_string(),
                source: EtcdError::Endpoint {
                    endpoint: e.to_string(),
                    reason,
                },
            };
            if e.starts_with("https://") {
                return Err(bad("TLS is not supported; use an http:// client URL"));
            }
            if host.is_empty() || host.contains('/') {
                return Err(bad("expected host:port or http://host:port"));
            }
            list.push(host.to_string());
        }
        if list.is_empty() {
            return Err(ArbiterError::Etcd {
                endpoints: String::new(),
                source: EtcdError::Endpoint {
                    endpoint: String::new(),
                    reason: "no endpoint given",
                },
            });
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .new_agent();
        Ok(Self {
            agent,
            endpoints: list,
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
            source,
        }
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
            match http_post(&self.agent, endpoint, path, &body, until) {
                Ok((200, response)) => {
                    return serde_json::from_slice(&response).map_err(|e| EtcdError::BadResponse {
                        endpoint: endpoint.clone(),
                        reason: format!("not JSON: {e}"),
                    });
                }
                Ok((status, response)) => {
                    let text =
                        String::from_utf8_lossy(&response[..response.len().min(300)]).into_owned();
                    last = EtcdError::Http {
                        endpoint: endpoint.clone(),
                        status,
                        body: text,
                    };
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    last = EtcdError::Timeout {
                        timeout: self.timeout,
                    };
                }
                Err(source) => {
                    last = EtcdError::Io {
                        endpoint: endpoint.clone(),
                        source,
                    };
                }
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
    endpoint: &str,
    path: &str,
    body: &str,
    deadline: Instant,
) -> io::Result<(u16, Vec<u8>)> {
    let url = format!("http://{endpoint}{path}");
    let mut response = agent
        .post(&url)
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

/// ureq's error as the I/O error the callers classify (a timeout is
/// `TimedOut`; an oversized or malformed answer is `InvalidData`).
fn from_ureq(error: ureq::Error) -> io::Error {
    match error {
        ureq::Error::Io(error) => error,
        ureq::Error::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, "etcd call timed out"),
        ureq::Error::BodyExceedsLimit(_) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("response larger than {MAX_RESPONSE} bytes"),
        ),
        ureq::Error::ConnectionFailed => {
            io::Error::new(io::ErrorKind::ConnectionRefused, "connection failed")
        }
        ureq::Error::HostNotFound => {
            io::Error::new(io::ErrorKind::NotFound, "the endpoint resolves to nothing")
        }
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
