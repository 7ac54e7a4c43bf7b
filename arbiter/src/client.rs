//! The client of the embedded arbiter server ([`crate::server`]).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::model::{Outcome, ReplicaId, VmId, VmRecord};
use crate::protocol::{
    self, Answer, Command, Key, NONCE_LEN, Nonce, ProtocolError, Status, VERSION,
};
use crate::{Arbiter, ArbiterError};

/// An [`Arbiter`] reached over TCP with the protocol of [`crate::protocol`].
///
/// Each call opens its own connection, so the value is `Sync` and a call
/// never depends on an earlier one; every call, connect included, finishes
/// within the timeout given to [`EmbeddedArbiter::connect`].
#[derive(Debug, Clone)]
pub struct EmbeddedArbiter {
    addr: SocketAddr,
    key: Key,
    timeout: Duration,
}

impl EmbeddedArbiter {
    /// A client of the arbiter at `addr`. Resolves the address but does not
    /// contact the arbiter: a replica must be able to start while the
    /// arbiter is down, and each call reports reachability on its own.
    pub fn connect(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        key: Key,
        timeout: Duration,
    ) -> Result<Self, ArbiterError> {
        let text = || format!("{addr:?}");
        let addr = addr
            .to_socket_addrs()
            .map_err(|source| ArbiterError::Unreachable {
                addr: text(),
                source,
            })?
            .next()
            .ok_or_else(|| ArbiterError::Unreachable {
                addr: text(),
                source: io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing"),
            })?;
        Ok(Self { addr, key, timeout })
    }

    /// Where the arbiter is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn call(&self, command: &Command) -> Result<Answer, ArbiterError> {
        let deadline = Instant::now() + self.timeout;
        let mut nonce: Nonce = [0; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| ArbiterError::Random(e.to_string()))?;
        let request = protocol::encode_request(&self.key, &nonce, command);

        let addr = self.addr.to_string();
        let io_error = |source: io::Error| {
            if matches!(
                source.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                ArbiterError::Timeout {
                    addr: addr.clone(),
                    timeout: self.timeout,
                }
            } else {
                ArbiterError::Unreachable {
                    addr: addr.clone(),
                    source,
                }
            }
        };
        let stream = TcpStream::connect_timeout(&self.addr, remaining(deadline).map_err(io_error)?)
            .map_err(io_error)?;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(remaining(deadline).map_err(io_error)?))
            .map_err(io_error)?;
        (&stream).write_all(&request).map_err(io_error)?;

        let mut reader = DeadlineReader {
            stream: &stream,
            deadline,
        };
        let reply = protocol::read_reply(&mut reader, &self.key).map_err(|e| match e {
            ProtocolError::Io(source) => io_error(source),
            ProtocolError::BadMac { unverified_status }
                if unverified_status == Status::AuthenticationFailed as u8 =>
            {
                ArbiterError::KeyRejected { addr: addr.clone() }
            }
            ProtocolError::BadMac { .. } => ArbiterError::NotAuthentic { addr: addr.clone() },
            source => ArbiterError::BadReply {
                addr: addr.clone(),
                source,
            },
        })?;
        match reply.status {
            Status::Ok if reply.nonce != nonce => Err(ArbiterError::NotAuthentic { addr }),
            Status::Ok => reply.answer.ok_or(ArbiterError::BadReply {
                addr,
                source: ProtocolError::Malformed("ok reply without an answer"),
            }),
            Status::UnsupportedVersion => Err(ArbiterError::VersionMismatch {
                addr,
                ours: VERSION,
                theirs: reply.version,
            }),
            Status::AuthenticationFailed => Err(ArbiterError::KeyRejected { addr }),
            Status::StorageFailure => Err(ArbiterError::Storage { addr }),
            status @ (Status::BadMagic | Status::Malformed | Status::InvalidRequest) => {
                Err(ArbiterError::Refused { addr, status })
            }
        }
    }
}

pub(crate) fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok(left)
    }
}

/// Reads with the socket timeout set to what is left until the deadline
/// before every read, so a server that drips bytes cannot stretch a call.
pub(crate) struct DeadlineReader<'a> {
    pub(crate) stream: &'a TcpStream,
    pub(crate) deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream
            .set_read_timeout(Some(remaining(self.deadline)?))?;
        self.stream.read(buf)
    }
}

fn unexpected(addr: SocketAddr, what: &'static str) -> ArbiterError {
    ArbiterError::BadReply {
        addr: addr.to_string(),
        source: ProtocolError::Malformed(what),
    }
}

fn outcome(addr: SocketAddr, answer: Answer) -> Result<Outcome, ArbiterError> {
    match answer {
        Answer::Won(record) => Ok(Outcome::Won(record)),
        Answer::Lost { reason, current } => Ok(Outcome::Lost { reason, current }),
        Answer::Absent | Answer::Present(_) => {
            Err(unexpected(addr, "a read's answer to a compare-and-set"))
        }
    }
}

impl Arbiter for EmbeddedArbiter {
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn read(&self, vm: VmId) -> Result<Option<VmRecord>, ArbiterError> {
        match self.call(&Command::Read { vm })? {
            Answer::Absent => Ok(None),
            Answer::Present(record) => Ok(Some(record)),
            Answer::Won(_) | Answer::Lost { .. } => {
                Err(unexpected(self.addr, "an outcome in answer to a read"))
            }
        }
    }

    fn test_and_set(
        &self,
        vm: VmId,
        expected: u64,
        candidate: &ReplicaId,
    ) -> Result<Outcome, ArbiterError> {
        let answer = self.call(&Command::TestAndSet {
            vm,
            expected,
            candidate: candidate.clone(),
        })?;
        outcome(self.addr, answer)
    }

    fn register(
        &self,
        vm: VmId,
        expected: u64,
        primary: &ReplicaId,
        backup: &ReplicaId,
    ) -> Result<Outcome, ArbiterError> {
        // Checked here too, so the caller gets the precise error.
        crate::model::decide_register(None, 0, primary, backup)?;
        let answer = self.call(&Command::Register {
            vm,
            expected,
            primary: primary.clone(),
            backup: backup.clone(),
        })?;
        outcome(self.addr, answer)
    }
}
