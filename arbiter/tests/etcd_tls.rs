//! The etcd backend over TLS with client certificates and an etcd login,
//! against a real etcd (Debian's `etcd-server`) on loopback, with
//! certificates this test makes (`openssl`, through `testbed::etcd::Pki`)
//! and users it adds with `etcdctl` (Debian's `etcd-client`).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::etcd::EtcdError;
use arbiter::{Arbiter, ArbiterError, EtcdArbiter, EtcdSecurity, error_chain};
use common::{TempDir, free_port, id};

const TIMEOUT: Duration = Duration::from_secs(3);
const PREFIX: &str = "/tls";

struct TlsEtcd {
    child: Child,
    /// `127.0.0.1:PORT`.
    endpoint: String,
    pki: testbed::etcd::Pki,
    dir: TempDir,
}

impl TlsEtcd {
    fn start() -> Self {
        let dir = TempDir::new("etcd-tls");
        let pki = testbed::etcd::Pki::make(dir.path(), &["127.0.0.1".parse().expect("ip")])
            .expect("certificates (openssl)");
        let (client_port, peer_port) = (free_port(), free_port());
        let endpoint = format!("127.0.0.1:{client_port}");
        let client = format!("https://{endpoint}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .arg("--name=tls")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tls={peer}"))
            .arg(format!("--cert-file={}", pki.server_cert.display()))
            .arg(format!("--key-file={}", pki.server_key.display()))
            .arg(format!("--trusted-ca-file={}", pki.ca.display()))
            .arg("--client-cert-auth")
            // Tokens expire after 2 s: the test waits one out.
            .arg("--auth-token-ttl=2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server)");
        let mut etcd = Self {
            child,
            endpoint,
            pki,
            dir,
        };
        let probe = etcd.arbiter(etcd.certs());
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe.read(0).is_err() {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!("etcd exited with {status}: {}", etcd.log());
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up in 30 s: {}",
                etcd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("etcds://{}", self.endpoint)
    }

    /// CA, client certificate and key; no login.
    fn certs(&self) -> EtcdSecurity {
        EtcdSecurity {
            ca: Some(self.pki.ca.clone()),
            cert: Some(self.pki.client_cert.clone()),
            key: Some(self.pki.client_key.clone()),
            ..EtcdSecurity::default()
        }
    }

    fn arbiter(&self, security: EtcdSecurity) -> EtcdArbiter {
        EtcdArbiter::from_url(&self.url(), &security, TIMEOUT)
            .expect("etcd arbiter")
            .with_prefix(PREFIX)
    }

    fn etcdctl(&self, args: &[&str]) {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://{}", self.endpoint))
            .arg(format!("--cacert={}", self.pki.ca.display()))
            .arg(format!("--cert={}", self.pki.client_cert.display()))
            .arg(format!("--key={}", self.pki.client_key.display()))
            .args(args)
            .output()
            .expect("etcdctl (Debian's etcd-client)");
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Turns on etcd v3 auth with a root user and a user `lockstep` that
    /// may read and write under [`PREFIX`] only.
    fn enable_auth(&self) {
        self.etcdctl(&["user", "add", "root", "--new-user-password=root-secret"]);
        self.etcdctl(&["user", "grant-role", "root", "root"]);
        self.etcdctl(&["user", "add", "lockstep", "--new-user-password=s3cret pass"]);
        self.etcdctl(&["role", "add", "lockstep-rw"]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            "lockstep-rw",
            "--prefix=true",
            "readwrite",
            PREFIX,
        ]);
        self.etcdctl(&["user", "grant-role", "lockstep", "lockstep-rw"]);
        self.etcdctl(&["--user=root:root-secret", "auth", "enable"]);
    }

    fn password_file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    fn login(&self, password_file: &Path) -> EtcdSecurity {
        EtcdSecurity {
            user: Some("lockstep".into()),
            password_file: Some(password_file.to_path_buf()),
            ..self.certs()
        }
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The etcd error under an arbiter error, and the whole chain as text.
fn etcd_error(error: &ArbiterError) -> (&EtcdError, String) {
    match error {
        ArbiterError::Etcd { source, .. } => (source.as_ref(), error_chain(error)),
        other => panic!("not an etcd error: {other:?}"),
    }
}

#[test]
fn etcd_over_tls_with_a_login_decides_once_and_refuses_a_wrong_ca_password_or_certificate() {
    let etcd = TlsEtcd::start();
    etcd.enable_auth();
    let good = etcd.password_file("password", "s3cret pass\n", 0o600);

    // Logged in, over TLS with a client certificate: exactly one winner.
    let arbiter = etcd.arbiter(etcd.login(&good));
    common::exactly_one_winner(Arc::new(arbiter.clone()), 1, 8);

    // The token expires (--auth-token-ttl=2): the next call logs in again.
    std::thread::sleep(Duration::from_secs(4));
    let record = arbiter.read(1).expect("a read after the token expired");
    assert_eq!(record.map(|r| r.generation), Some(2));

    // Auth is on: without a login the key is out of reach.
    let anonymous = etcd.arbiter(etcd.certs());
    let error = anonymous.read(1).expect_err("no login");
    assert!(!error.is_unreachable(), "{error:?}");

    // A wrong password: refused at once, naming the endpoint and user.
    let wrong = etcd.password_file("wrong", "not the password\n", 0o600);
    let started = Instant::now();
    let error = etcd
        .arbiter(etcd.login(&wrong))
        .test_and_set(1, 2, &id("backup"))
        .expect_err("a wrong password wins nothing");
    let (source, text) = etcd_error(&error);
    assert!(matches!(source, EtcdError::Auth { .. }), "{text}");
    assert!(
        text.contains(&etcd.endpoint) && text.contains("lockstep"),
        "{text}"
    );
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(1));

    // A CA that did not sign etcd's certificate: a TLS error naming the
    // endpoint, within the timeout.
    let started = Instant::now();
    let error = etcd
        .arbiter(EtcdSecurity {
            ca: Some(etcd.pki.other_ca.clone()),
            ..etcd.login(&good)
        })
        .read(1)
        .expect_err("a wrong CA");
    let (source, text) = etcd_error(&error);
    assert!(matches!(source, EtcdError::Tls { .. }), "{text}");
    assert!(text.contains(&etcd.endpoint), "{text}");
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(1));

    // No client certificate: etcd (--client-cert-auth) refuses the TLS
    // session.
    let error = etcd
        .arbiter(EtcdSecurity {
            cert: None,
            key: None,
            ..etcd.login(&good)
        })
        .read(1)
        .expect_err("no client certificate");
    let (_, text) = etcd_error(&error);
    assert!(text.contains(&etcd.endpoint), "{text}");

    // Plain HTTP to a TLS member is no answer either.
    let plain = EtcdArbiter::new(&[etcd.endpoint.as_str()], TIMEOUT).expect("arbiter");
    assert!(plain.read(1).is_err());
}

#[test]
fn bad_tls_and_password_settings_are_refused_before_any_call_naming_the_file() {
    let dir = TempDir::new("etcd-settings");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("open"), "pw\n").expect("write");
    std::fs::set_permissions(path("open"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::write(path("empty"), "").expect("write");
    std::fs::set_permissions(path("empty"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(path("not-pem"), "hello").expect("write");
    let cases: Vec<(&str, EtcdSecurity, Vec<String>)> = vec![
        (
            "etcds://127.0.0.1:1",
            EtcdSecurity::default(),
            vec!["CA".into()],
        ),
        (
            "etcds://127.0.0.1:1",
            EtcdSecurity {
                ca: Some(path("missing.crt")),
                ..EtcdSecurity::default()
            },
            vec!["missing.crt".into()],
        ),
        (
            "etcds://127.0.0.1:1",
            EtcdSecurity {
                ca: Some(path("not-pem")),
                ..EtcdSecurity::default()
            },
            vec!["not-pem".into(), "no PEM certificate".into()],
        ),
        (
            "etcd://127.0.0.1:1",
            EtcdSecurity {
                user: Some("u".into()),
                password_file: Some(path("open")),
                ..EtcdSecurity::default()
            },
            vec!["open".into(), "chmod 600".into()],
        ),
        (
            "etcd://127.0.0.1:1",
            EtcdSecurity {
                user: Some("u".into()),
                password_file: Some(path("empty")),
                ..EtcdSecurity::default()
            },
            vec!["empty".into()],
        ),
        (
            "etcd://127.0.0.1:1",
            EtcdSecurity {
                user: Some("u".into()),
                ..EtcdSecurity::default()
            },
            vec!["password file".into()],
        ),
        (
            "etcd://127.0.0.1:1",
            EtcdSecurity {
                ca: Some(path("not-pem")),
                ..EtcdSecurity::default()
            },
            vec!["etcds://".into()],
        ),
        (
            "http://127.0.0.1:1",
            EtcdSecurity::default(),
            vec!["etcd://".into()],
        ),
    ];
    for (url, security, expected) in cases {
        let error = EtcdArbiter::from_url(url, &security, TIMEOUT).expect_err(url);
        let text = error_chain(&error);
        for what in expected {
            assert!(
                text.contains(&what),
                "{url} {security:?}: no {what:?} in {text}"
            );
        }
    }
}
