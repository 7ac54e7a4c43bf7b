//! The testbed for real: namespaces, bridges, veths and tbf on this kernel,
//! traffic across every link, shaping measured with iperf3, cuts, two
//! testbeds at once, and the clean-up of a run whose owner was SIGKILLed.
//! Needs root, iproute2 and iperf3 (installed by .ci/run).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::{Config, Link, Ns, Rate, Testbed};

/// Listens inside `listen_ns` on `address`, connects from `from`, and
/// checks that a few bytes cross both ways.
fn reachable(bed: &Testbed, listen_ns: Ns, address: Ipv4Addr, from: Ns) -> bool {
    let listener = bed
        .run_in(listen_ns, || TcpListener::bind((address, 0)))
        .expect("enter")
        .expect("bind");
    let target = listener.local_addr().expect("address");
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut word = [0u8; 4];
        stream.read_exact(&mut word).expect("read");
        stream.write_all(&word).expect("write");
    });
    let Ok(mut stream) = bed.connect(from, target, Duration::from_secs(2)) else {
        // Unblock the server thread.
        let _ = bed.connect(listen_ns, target, Duration::from_secs(2));
        let _ = server.join();
        return false;
    };
    stream.write_all(b"ping").expect("write");
    let mut echo = [0u8; 4];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.read_exact(&mut echo).expect("echo");
    server.join().expect("server");
    &echo == b"ping"
}

/// iperf3 from `from` to a server in `server_ns` at `address`, for 2 s:
/// the receiver's Mbit/s.
fn iperf3_mbit(bed: &Testbed, server_ns: Ns, address: Ipv4Addr, from: Ns) -> f64 {
    let mut server = bed
        .command(server_ns, "iperf3")
        .expect("namespace")
        .args(["-s", "-1", "-B", &address.to_string(), "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (Debian's iperf3 package)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed
        .connect(
            from,
            SocketAddr::from((address, 5201)),
            Duration::from_millis(200),
        )
        .is_err()
    {
        assert!(Instant::now() < deadline, "iperf3 -s did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    // That probe was the server's one test (-1): start it again.
    let _ = server.wait();
    let mut server = bed
        .command(server_ns, "iperf3")
        .expect("namespace")
        .args(["-s", "-1", "-B", &address.to_string(), "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    let output = loop {
        let output = bed
            .command(from, "iperf3")
            .expect("namespace")
            .args(["-c", &address.to_string(), "-p", "5201", "-t", "2", "-J"])
            .output()
            .expect("iperf3 -c");
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = server.wait();
    let json = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "iperf3 -c failed: {json}");
    let at = json.find("\"sum_received\"").expect("sum_received");
    let rest = &json[at..];
    let at = rest.find("\"bits_per_second\":").expect("bits_per_second") + 18;
    let number: String = rest[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+')
        .collect();
    number.parse::<f64>().expect("a rate") / 1e6
}

fn namespaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns")
            .stdout,
    )
    .into_owned()
}

fn root_interfaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link")
            .stdout,
    )
    .into_owned()
}

#[test]
fn hosts_reach_each_other_links_are_shaped_and_cut_and_nothing_is_left() {
    let bed = Testbed::up(&Config {
        client_link: Rate::Mbit(200),
        ..Config::new("test")
    })
    .expect("testbed up");
    let at = bed.addresses().clone();
    let names: Vec<String> = Ns::ALL.iter().map(|&ns| bed.netns(ns)).collect();
    let listed = namespaces();
    for name in &names {
        assert!(name.starts_with("lst-"), "{name}");
        assert!(listed.contains(name.as_str()), "{name} not in {listed}");
    }
    // Nothing of the testbed in the root namespace.
    let root = root_interfaces();
    for device in ["sw0", "br0", "up0", "log0", "mg0", "tap0"] {
        assert!(
            !root.contains(&format!(": {device}:")),
            "{device} in the root namespace"
        );
    }
    // A command runs inside its namespace: host a has its addresses.
    let shown = bed
        .command(Ns::A, "ip")
        .expect("namespace")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip");
    let shown = String::from_utf8_lossy(&shown.stdout);
    for address in [at.lan_a, at.log_a, at.mgmt_a] {
        assert!(shown.contains(&format!("{address}/24")), "{shown}");
    }
    assert!(shown.contains(" tap0") || bed.status().is_ok());

    // Every path the deployment uses.
    assert!(
        reachable(&bed, Ns::Client, at.client, Ns::A),
        "client link a"
    );
    assert!(
        reachable(&bed, Ns::Client, at.client, Ns::B),
        "client link b"
    );
    assert!(reachable(&bed, Ns::B, at.log_b, Ns::A), "logging link");
    assert!(reachable(&bed, Ns::Arbiter, at.arbiter, Ns::A), "mgmt a");
    assert!(reachable(&bed, Ns::Arbiter, at.arbiter, Ns::B), "mgmt b");
    // The client segment does not reach the logging link or the arbiter.
    assert!(
        !reachable(&bed, Ns::B, at.log_b, Ns::Client),
        "the client reaches the logging link"
    );

    // tbf on both ends of the client links, at the configured rate.
    let status = bed.status().expect("status");
    for link in [Link::ClientA, Link::ClientB] {
        for end in &status.link(link).expect("link").ends {
            assert_eq!(
                end.tbf_rate.as_deref(),
                Some("200Mbit"),
                "{link} at {}",
                end.ns
            );
            assert!(end.up);
        }
    }
    assert!(
        status
            .link(Link::Log)
            .expect("log")
            .ends
            .iter()
            .all(|end| end.tbf_rate.is_none())
    );
    let text = status.to_string();
    assert!(text.contains("link client-a"), "{text}");

    // Shaped, then unshaped, measured in one run: the shaped rate holds and
    // the veth without tbf is much faster.
    let shaped = iperf3_mbit(&bed, Ns::Client, at.client, Ns::A);
    assert!(
        (40.0..=240.0).contains(&shaped),
        "tbf at 200 Mbit/s measured {shaped:.0} Mbit/s"
    );
    let back = iperf3_mbit(&bed, Ns::A, at.lan_a, Ns::Client);
    assert!(
        (40.0..=240.0).contains(&back),
        "the other direction measured {back:.0} Mbit/s"
    );
    bed.set_rate(Link::ClientA, Rate::Unshaped)
        .expect("unshape");
    let unshaped = iperf3_mbit(&bed, Ns::Client, at.client, Ns::A);
    assert!(
        unshaped > 2.0 * shaped,
        "unshaped {unshaped:.0} Mbit/s against shaped {shaped:.0}"
    );
    let status = bed.status().expect("status");
    assert!(
        status
            .link(Link::ClientA)
            .expect("link")
            .ends
            .iter()
            .all(|end| end.tbf_rate.is_none())
    );
    bed.set_rate(Link::Log, Rate::Mbit(10_000)).expect("10G");
    let status = bed.status().expect("status");
    assert!(
        status
            .link(Link::Log)
            .expect("log")
            .ends
            .iter()
            .all(|end| end.tbf_rate.as_deref() == Some("10Gbit")),
        "{status}"
    );

    // Cut and restore the logging link: a partition, then healed.
    bed.cut(Link::Log).expect("cut");
    assert!(
        !reachable(&bed, Ns::B, at.log_b, Ns::A),
        "the cut logging link still carries traffic"
    );
    assert!(bed.status().expect("status").to_string().contains("CUT"));
    assert!(
        reachable(&bed, Ns::Arbiter, at.arbiter, Ns::A),
        "cutting the logging link cut management too"
    );
    bed.restore(Link::Log).expect("restore");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reachable(&bed, Ns::B, at.log_b, Ns::A) {
        assert!(Instant::now() < deadline, "the logging link did not heal");
    }
    // One host's client link.
    bed.cut(Link::ClientA).expect("cut");
    assert!(!reachable(&bed, Ns::Client, at.client, Ns::A));
    assert!(reachable(&bed, Ns::Client, at.client, Ns::B));
    bed.restore(Link::ClientA).expect("restore");

    let run = bed.run_id().to_string();
    drop(bed);
    let listed = namespaces();
    for name in &names {
        assert!(!listed.contains(name.as_str()), "{name} left behind");
    }
    assert!(!Path::new(&format!("{}/{run}.state", testbed::STATE_DIR)).exists());
    assert!(matches!(
        Testbed::attach(&run),
        Err(testbed::TestbedError::NotFound(_))
    ));
}

#[test]
fn two_testbeds_at_once_never_collide() {
    let beds: Vec<Testbed> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| Testbed::up(&Config::new("test")).expect("up")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_ne!(beds[0].run_id(), beds[1].run_id());
    assert_ne!(beds[0].netns(Ns::Client), beds[1].netns(Ns::Client));
    assert_ne!(beds[0].addresses().guest, beds[1].addresses().guest);
    assert_ne!(beds[0].addresses().log_a, beds[1].addresses().log_a);
    for bed in &beds {
        let at = bed.addresses().clone();
        assert!(reachable(bed, Ns::Client, at.client, Ns::A));
        assert!(reachable(bed, Ns::B, at.log_b, Ns::A));
        // Attached handles see the same run and do not remove it on drop.
        let attached = Testbed::attach(bed.run_id()).expect("attach");
        assert_eq!(attached.addresses(), bed.addresses());
        drop(attached);
        assert!(reachable(bed, Ns::Client, at.client, Ns::B));
    }
    // One testbed's namespaces cannot reach the other's addresses.
    let other = beds[1].addresses().client;
    assert!(
        beds[0]
            .connect(
                Ns::A,
                SocketAddr::from((other, 9)),
                Duration::from_millis(500)
            )
            .is_err()
    );
}

/// Not a test by itself: the child that `a_killed_owners_testbed_…` starts
/// (with LOCKSTEP_TESTBED_CHILD set) builds a testbed, starts a process in
/// it, prints both, and waits to be killed.
#[test]
fn child_that_owns_a_testbed_until_killed() {
    if std::env::var_os("LOCKSTEP_TESTBED_CHILD").is_none() {
        return;
    }
    let bed = Testbed::up(&Config::new("test-child")).expect("up");
    let mut sleeper = bed
        .command(Ns::A, "sleep")
        .expect("namespace")
        .arg("600")
        .spawn()
        .expect("sleep");
    println!("run {} sleeper {}", bed.run_id(), sleeper.id());
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(600));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn a_killed_owners_testbed_is_removed_at_the_next_start() {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_that_owns_a_testbed_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LOCKSTEP_TESTBED_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child");
    let stdout = child.stdout.take().expect("stdout");
    // libtest may print `test NAME ... ` before the child's own words.
    let (report, reports) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            if let Some(at) = words
                .windows(4)
                .position(|w| w[0] == "run" && w[2] == "sleeper")
            {
                let _ = report.send((words[at + 1].clone(), words[at + 3].clone()));
            }
        }
    });
    let Ok((run, sleeper)) = reports.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child never reported its testbed");
    };
    let sleeper: u32 = sleeper.parse().expect("pid");
    let names: Vec<String> = Ns::ALL
        .iter()
        .map(|&ns| testbed::plan::namespace_name(&run, ns))
        .collect();
    assert!(namespaces().contains(names[0].as_str()));
    child.kill().expect("SIGKILL the owner");
    child.wait().expect("reap");
    // Its namespaces outlive it (and so does the process it left inside) …
    assert!(namespaces().contains(names[1].as_str()));
    assert!(Path::new(&format!("/proc/{sleeper}")).exists());
    let listed = Testbed::list().expect("list");
    assert!(
        listed
            .iter()
            .any(|(record, alive)| record.run == run && !alive),
        "the dead owner's run is not marked stale: {listed:?}"
    );
    // … until the next testbed starts.
    let bed = Testbed::up(&Config::new("test")).expect("up");
    if bed.run_id() == run {
        // The slot was freed and taken again: the record is ours now.
        assert_eq!(bed.record().pid, std::process::id());
    } else {
        let listed = namespaces();
        for name in &names {
            assert!(!listed.contains(name.as_str()), "stale {name} left behind");
        }
        assert!(!Path::new(&format!("{}/{run}.state", testbed::STATE_DIR)).exists());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{sleeper}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z"))
    {
        assert!(
            Instant::now() < deadline,
            "the stale run's process still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(bed);
}
