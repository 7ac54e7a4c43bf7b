//! The `net` guest's Redis-protocol store: a RESP2 subset of Redis 7.0 that
//! stock `redis-cli`, `redis-benchmark` (its whole default suite, pipelined
//! and with hundreds of connections) and client libraries use unmodified.
//!
//! `no_std` + `alloc` and free of I/O, so the guest embeds it and the host's
//! test suite tests it (`cargo test -p guest-redis`). The guest owns the
//! sockets; this crate turns request bytes into reply bytes:
//!
//! ```text
//!  socket bytes ─▶ resp::parse ─▶ Args ─▶ Server::execute ─▶ commands::TABLE
//!                  (codec)                 │ lookup, arity, -OOM gate  │ handler(ctx, args)
//!                                          ▼                           ▼
//!  socket ◀─ output buffer ◀──────── resp::Reply ◀────────────────── db::Db (data types)
//! ```
//!
//! Module map: [`resp`] (the codec), [`db`] (keyspace, data types, expiry),
//! [`commands`] (the command table and the handlers, one module per data
//! type), [`glob`] (KEYS/SCAN patterns), [`num`] (Redis's number formats).
//!
//! # Determinism
//!
//! Everything here is a function of the requests, the time and the memory
//! figure the caller passes in and the seed given at start. In the guest
//! those come from logged exits (the clock from `WAIT`, the seed from
//! `ENTROPY`) and from the guest's own heap, so a backup replaying the log
//! computes the same replies, expiries and SPOP picks.
//!
//! # Memory
//!
//! Redis's `maxmemory` with the `noeviction` policy: once the used-memory
//! figure the caller reports exceeds [`Config::maxmemory`], commands that may
//! grow the dataset (flag `denyoom`) are refused with `-OOM command not
//! allowed when used memory > 'maxmemory'.`, while reads and deletes go on.
//! Below that line every allocation that a request can make large (request
//! arguments, appends, list/hash growth, replies) is fallible: a failure
//! becomes `-OOM` for that command and never an abort of the guest.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod commands;
pub mod db;
pub mod glob;
pub mod num;
pub mod resp;

pub use commands::{After, Client, Config, Server};
pub use resp::{Parsed, parse};

#[cfg(test)]
mod tests;
