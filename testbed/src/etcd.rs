//! etcd for tests and chaos runs: a cluster of etcd members (Debian's
//! `etcd-server`), one per extra host of a testbed, and the certificates a
//! TLS cluster needs, made with the `openssl` command.
//!
//! ```text
//!  lst-<run>-arb: mg0 bridge ─┬─ a0 ── host a (replica)
//!                             ├─ b0 ── host b (replica)
//!                             ├─ x0 ── lst-<run>-x0: etcd m0  .21:2379 (clients)
//!                             ├─ x1 ── lst-<run>-x1: etcd m1  .22:2379  .2x:2380
//!                             └─ x2 ── lst-<run>-x2: etcd m2  .23:2379  (peers)
//! ```
//!
//! Every member listens for clients and peers on its own namespace's
//! management address only (never in the root namespace); with a [`Pki`]
//! the client URLs are HTTPS with `--client-cert-auth` (peers stay plain
//! HTTP on the management network). [`Cluster::kill`] SIGKILLs a member
//! and [`Cluster::restart`] starts it again on its data directory.
//!
//! [`Pki::make`] writes, under a directory: a CA (`ca.crt`), a server
//! certificate for the given IP addresses (SANs) signed by it
//! (`server.crt`, `server.key`), a client certificate (`client.crt`,
//! `client.key`, subject `O=lockstep-client` and no CN, which etcd 3.4's
//! gateway requires once auth is on), and a second CA that signed
//! nothing (`other-ca.crt`), for "wrong CA" tests. Keys are P-256, valid
//! one day.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{Testbed, TestbedError};

/// The client port of every member (each on its own address).
pub const CLIENT_PORT: u16 = 2379;
/// The peer port of every member.
pub const PEER_PORT: u16 = 2380;

/// Certificates for a TLS etcd (see the module docs).
#[derive(Clone, Debug)]
pub struct Pki {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// The members' certificate (every address as an IP SAN).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The client's certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), TestbedError> {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            program: "openssl (Debian package openssl)".into(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(TestbedError::Command {
        command: format!("openssl {}", args.join(" ")),
        stderr: format!(
            "{} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        ),
    })
}

fn write(path: &Path, text: &str) -> Result<(), TestbedError> {
    std::fs::write(path, text).map_err(|source| TestbedError::File {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

impl Pki {
    /// Makes the CA and certificates under `dir` (which must exist) for a
    /// server reached at `ips`.
    pub fn make(dir: &Path, ips: &[IpAddr]) -> Result<Pki, TestbedError> {
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for (name, cn) in [
            ("ca", "lockstep-test-ca"),
            ("other-ca", "lockstep-other-ca"),
        ] {
            let (keyout, out, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend_from_slice(&key);
            args.extend_from_slice(&["-nodes", "-keyout", &keyout, "-out", &out]);
            args.extend_from_slice(&["-days", "1", "-subj", &subj]);
            openssl(dir, &args)?;
        }
        let sans = ips
            .iter()
            .map(|ip| format!("IP:{ip}"))
            .collect::<Vec<_>>()
            .join(",");
        write(
            &dir.join("server.ext"),
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={sans}\n"
            ),
        )?;
        write(
            &dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )?;
        // The client's certificate has no CN: etcd 3.4's JSON gateway
        // refuses requests with a client certificate that has one once
        // auth is on ("CommonName of client sending a request against
        // gateway will be ignored").
        for (name, subject) in [("server", "/CN=etcd"), ("client", "/O=lockstep-client")] {
            let (keyout, csr, crt, ext, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
                subject.to_string(),
            );
            let mut args = vec!["req"];
            args.extend_from_slice(&key);
            args.extend_from_slice(&["-nodes", "-keyout", &keyout, "-out", &csr, "-subj", &subj]);
            openssl(dir, &args)?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "1",
                    "-extfile",
                    &ext,
                ],
            )?;
        }
        Ok(Pki {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.crt"),
        })
    }
}

/// One member: where it runs and how to start it again.
struct Member {
    host: u8,
    args: Vec<String>,
    child: Option<Child>,
}

/// An etcd cluster, one member per extra host of a testbed (see the
/// module docs). Dropping it SIGKILLs the members.
pub struct Cluster {
    members: Vec<Member>,
    endpoints: Vec<String>,
    pki: Option<Pki>,
}

impl Cluster {
    /// Adds extra hosts `0..n` to `bed` and starts one etcd member in
    /// each, its data under `dir`; HTTPS for clients if `pki` is given
    /// (its server certificate must name every member's address). Does
    /// not wait for the cluster to answer (the caller asks it, as its
    /// clients will).
    pub fn start(
        bed: &Testbed,
        dir: &Path,
        n: u8,
        pki: Option<&Pki>,
    ) -> Result<Cluster, TestbedError> {
        let scheme = if pki.is_some() { "https" } else { "http" };
        let address = |i: u8| bed.addresses().extra_host(i);
        let peer = |i: u8| format!("http://{}:{PEER_PORT}", address(i));
        let cluster = (0..n)
            .map(|i| format!("m{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        let mut endpoints = Vec::new();
        for i in 0..n {
            bed.add_host(i)?;
            let client = format!("{scheme}://{}:{CLIENT_PORT}", address(i));
            endpoints.push(format!("{}:{CLIENT_PORT}", address(i)));
            let mut args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.join(format!("etcd-m{i}")).display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={}", peer(i)),
                format!("--initial-advertise-peer-urls={}", peer(i)),
                format!("--initial-cluster={cluster}"),
                "--initial-cluster-state=new".into(),
                format!("--initial-cluster-token=lockstep-{}", bed.run_id()),
                // Short token lifetimes so tests see a token expire.
                "--auth-token-ttl=2".into(),
            ];
            if let Some(pki) = pki {
                args.push(format!("--cert-file={}", pki.server_cert.display()));
                args.push(format!("--key-file={}", pki.server_key.display()));
                args.push(format!("--trusted-ca-file={}", pki.ca.display()));
                args.push("--client-cert-auth".into());
            }
            let log = dir.join(format!("etcd-m{i}.log"));
            let mut member = Member {
                host: i,
                args,
                child: None,
            };
            member.child = Some(spawn(bed, &member, &log)?);
            members.push(member);
        }
        Ok(Cluster {
            members,
            endpoints,
            pki: pki.cloned(),
        })
    }

    /// The members' client endpoints, `HOST:PORT`, in member order.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The `--arbiter` URL naming every member: `etcd://…` or `etcds://…`.
    pub fn url(&self) -> String {
        let scheme = if self.pki.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints.join(","))
    }

    /// SIGKILLs member `i` (and reaps it).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory (after [`Cluster::kill`]).
    pub fn restart(&mut self, bed: &Testbed, i: usize, dir: &Path) -> Result<(), TestbedError> {
        self.kill(i);
        let Some(member) = self.members.get_mut(i) else {
            return Ok(());
        };
        let log = dir.join(format!("etcd-m{i}.restarted.log"));
        member.child = Some(spawn(bed, member, &log)?);
        Ok(())
    }

    /// `etcdctl` (Debian's `etcd-client`) in the arbiter's namespace,
    /// aimed at every member, with the client certificate if TLS.
    pub fn etcdctl(&self, bed: &Testbed) -> Result<Command, TestbedError> {
        let mut command = bed.command(crate::Ns::Arbiter, "etcdctl")?;
        command.env("ETCDCTL_API", "3");
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect::<Vec<_>>()
            .join(",");
        command.arg(format!("--endpoints={endpoints}"));
        if let Some(pki) = &self.pki {
            command.arg(format!("--cacert={}", pki.ca.display()));
            command.arg(format!("--cert={}", pki.client_cert.display()));
            command.arg(format!("--key={}", pki.client_key.display()));
        }
        Ok(command)
    }
}

fn spawn(bed: &Testbed, member: &Member, log: &Path) -> Result<Child, TestbedError> {
    let log = std::fs::File::create(log).map_err(|source| TestbedError::File {
        what: "cannot create",
        path: log.to_path_buf(),
        source,
    })?;
    bed.extra_host_command(member.host, "etcd")?
        .args(&member.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|source| TestbedError::Spawn {
            program: "etcd (Debian package etcd-server)".into(),
            source,
        })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
