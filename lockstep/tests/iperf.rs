//! Stock iperf3 (Debian's `iperf3`, installed by .ci/run) against the `net`
//! guest's iperf3 server, FT off and FT on. Needs root, /dev/kvm,
//! /dev/net/tun and iproute2.
//!
//! Every test runs on a testbed of its own (`common::Net`): the guest's TAP
//! in host a (and b), iperf3 in the client namespace, the primary/backup log
//! over the logging link; nothing in the root namespace.

extern crate alloc;

mod common;

/// The guest's bounded JSON reader, compiled for the host and tested at the
/// end of this file.
#[allow(dead_code)]
#[path = "../../guest/src/json.rs"]
mod json;

use std::io::{Read, Write};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Net, Ns, stop};

/// The guest's iperf3 port.
const PORT: u16 = 5201;

/// Runs stock iperf3 in the client namespace against the guest with `-J`
/// and checks what any run must show; returns (sent, received) bit/s.
fn iperf3(net: &Net, args: &[&str]) -> (f64, f64) {
    let host = net.host();
    let mut full = vec!["-c", &host, "-J"];
    full.extend_from_slice(args);
    let output = net
        .bed
        .command(Ns::Client, "timeout")
        .expect("client namespace")
        .args(["60", "iperf3"])
        .args(&full)
        .output()
        .expect("run iperf3 (Debian's iperf3 package)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "iperf3 {full:?} failed ({}): {text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 {full:?} printed no JSON ({e}): {text}"));
    // With -J, iperf3 exits 0 even after an error, which it reports here.
    assert!(
        report.get("error").is_none(),
        "iperf3 {full:?} reported an error: {text}"
    );
    let end = &report["end"];
    let figure = |sum: &str, key: &str| {
        end[sum][key]
            .as_f64()
            .unwrap_or_else(|| panic!("no end.{sum}.{key} in {text}"))
    };
    for sum in ["sum_sent", "sum_received"] {
        assert!(
            figure(sum, "bytes") > 0.0,
            "iperf3 {full:?}: no bytes in end.{sum}: {text}"
        );
    }
    let streams = end["streams"].as_array().map_or(0, Vec::len);
    let parallel = full
        .windows(2)
        .find(|w| w[0] == "-P")
        .map_or(1, |w| w[1].parse().expect("-P value"));
    let directions = if full.contains(&"--bidir") { 2 } else { 1 };
    assert_eq!(
        streams,
        parallel * directions,
        "one entry per stream: {text}"
    );
    (
        figure("sum_sent", "bits_per_second"),
        figure("sum_received", "bits_per_second"),
    )
}

fn mbit(bits_per_second: f64) -> f64 {
    bits_per_second / 1e6
}

/// Everything a raw client in the client namespace gets, until the guest
/// closes the connection, after sending a cookie and `then`.
fn raw_client(net: &Net, then: &[u8]) -> Vec<u8> {
    let mut stream = net.connect(PORT);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"lockstep-iperf-test-cookie-123456789\0")
        .expect("cookie");
    stream.write_all(then).expect("send");
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("reply until the guest closes");
    reply
}

/// The FT-off VM in host a.
fn start_guest(net: &Net) -> Child {
    let arg = net.guest_arg();
    net.start(
        Ns::A,
        &["run", "--guest", "net", "--tap", net.tap(), "--arg", &arg],
    )
}

#[test]
fn stock_iperf3_receive_and_transmit_ft_off() {
    let net = Net::new();
    let guest = start_guest(&net);

    let (sent, received) = iperf3(&net, &["-t", "2"]);
    eprintln!(
        "FT off receive (iperf3 -c): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );
    let (sent, received) = iperf3(&net, &["-t", "2", "-R"]);
    eprintln!(
        "FT off transmit (iperf3 -c -R): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );
    iperf3(&net, &["-t", "1", "-P", "2"]);
    iperf3(&net, &["-t", "1", "-R", "-P", "3"]);
    iperf3(&net, &["-n", "4M"]);
    iperf3(&net, &["-t", "1", "--bidir"]);
    iperf3(&net, &["-t", "1", "-O", "1"]);
    // -b paces the guest's sending: never faster than asked (under load
    // it can only be slower).
    let (_, paced) = iperf3(&net, &["-t", "2", "-R", "-b", "40M"]);
    assert!(
        paced > 0.0 && paced < 60e6,
        "-R -b 40M received {:.1} Mbit/s",
        mbit(paced)
    );
    let output = stop(guest);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("was stopped by the host"),
        "{stdout}{stderr}"
    );
}

#[test]
fn one_test_at_a_time_and_bad_clients_get_iperf3_errors() {
    let net = Net::new();
    let guest = start_guest(&net);

    // A second stock client while a test runs: "the server is busy".
    let host = net.host();
    let first = net
        .bed
        .command(Ns::Client, "timeout")
        .expect("client namespace")
        .args(["60", "iperf3", "-c", &host, "-t", "4", "-J"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3");
    std::thread::sleep(Duration::from_millis(1500));
    let second = net
        .bed
        .command(Ns::Client, "timeout")
        .expect("client namespace")
        .args(["30", "iperf3", "-c", &host, "-t", "1"])
        .output()
        .expect("iperf3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(!second.status.success(), "{text}");
    assert!(text.contains("the server is busy running a test"), "{text}");
    let first = first.wait_with_output().expect("first iperf3");
    let report = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{report}");
    assert!(
        !report.contains("\"error\""),
        "the running test was not disturbed: {report}"
    );

    // Hand-made bad control messages: PARAM_EXCHANGE (9), then SERVER_ERROR
    // (-2) with iperf3's error number and an errno, big-endian.
    let server_error = |number: i32, errno: i32| {
        let mut bytes = vec![9u8, 0xfe];
        bytes.extend_from_slice(&number.to_be_bytes());
        bytes.extend_from_slice(&errno.to_be_bytes());
        bytes
    };
    let framed = |json: &str| {
        let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes
    };
    // IERECVPARAMS, EMSGSIZE: a 4 GiB parameter message is refused at once.
    assert_eq!(
        raw_client(&net, &[0xff, 0xff, 0xff, 0xff]),
        server_error(114, 90)
    );
    // IERECVPARAMS, EINVAL: not JSON.
    assert_eq!(
        raw_client(&net, &framed("{\"tcp\":true,\"time\":")),
        server_error(114, 22)
    );
    // IEPROTOCOL: UDP is not served.
    assert_eq!(
        raw_client(&net, &framed("{\"udp\":true,\"time\":1}")),
        server_error(131, 0)
    );
    // IENUMSTREAMS: more streams than the guest serves.
    assert_eq!(
        raw_client(&net, &framed("{\"tcp\":true,\"parallel\":99}")),
        server_error(6, 0)
    );
    // IEMESSAGE: an unknown state byte after CREATE_STREAMS (10).
    let mut unknown = framed("{\"tcp\":true,\"parallel\":1,\"time\":1}");
    unknown.push(99);
    let mut expected = vec![9u8, 10];
    expected.extend_from_slice(&server_error(110, 0)[1..]);
    assert_eq!(raw_client(&net, &unknown), expected);

    // A client SIGKILLed in the middle of a test (receive, then transmit):
    // the guest notices its control connection close and serves the next.
    for reverse in [false, true] {
        let mut args = vec!["-c", &host, "-t", "30"];
        if reverse {
            args.push("-R");
        }
        let mut doomed = net
            .bed
            .command(Ns::Client, "iperf3")
            .expect("client namespace")
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3");
        std::thread::sleep(Duration::from_millis(1500));
        // The testbed's command execs iperf3: this pid is iperf3's.
        doomed.kill().expect("SIGKILL iperf3");
        let _ = doomed.wait();
        iperf3(&net, &["-t", "1"]);
    }

    // After all that, a stock client still runs a full test.
    iperf3(&net, &["-t", "1"]);
    let output = stop(guest);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("was stopped by the host"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn stock_iperf3_against_an_ft_pair_and_the_backup_matches() {
    let net = Net::new();
    // The log crosses the testbed's logging link, host a to host b.
    let status_dir = tempfile::tempdir().expect("tempdir");
    let status = status_dir.path().join("status");
    let status = status.to_str().expect("utf-8");
    let key = common::keygen(status_dir.path(), "link.key");
    let key = key.to_str().expect("utf-8");
    let both = ["--peer-timeout-ms", "20000", "--status-dir", status];
    let both = [&both[..], &["--link-key", key]].concat();
    let (primary, backup) = net.start_pair(&both, &["--quiet"], &["--digest-interval", "300"]);

    let (sent, received) = iperf3(&net, &["-t", "2"]);
    eprintln!(
        "FT on receive (iperf3 -c): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );
    let (sent, received) = iperf3(&net, &["-t", "2", "-R"]);
    eprintln!(
        "FT on transmit (iperf3 -c -R): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );

    let primary: Output = stop(primary);
    let primary_err = String::from_utf8_lossy(&primary.stderr);
    assert!(
        primary_err.contains("(everything)"),
        "the backup acknowledged every entry: {primary_err}"
    );
    let backup = wait_with_deadline(backup, Duration::from_secs(30));
    let summary = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "backup failed: {summary}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let line = summary.lines().last().expect("backup summary");
    assert!(line.starts_with("backup:"), "{line}");
    let (matched, taken) = common::digests(line);
    assert_eq!(
        matched, taken,
        "primary's and backup's digests match at the same exits: {line}"
    );
    assert!(matched >= 2, "{line}");
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// The parameters stock iperf3 3.12 sends (`iperf3 -c -t 1 -d`), unformatted.
const PARAMS_3_12: &str = r#"{"tcp":true,"omit":0,"time":1,"num":0,"blockcount":0,"parallel":1,"len":131072,"pacing_timer":1000,"client_version":"3.12"}"#;

/// Results as stock iperf3 3.12 sends them.
const RESULTS_3_12: &str = r#"{"cpu_util_total":2.72613475298209,"cpu_util_user":0.571821011256204,"cpu_util_system":2.1541189134426646,"sender_has_retransmits":1,"congestion_used":"bbr","streams":[{"id":1,"bytes":89522176,"retransmits":1,"jitter":0,"errors":0,"packets":0,"start_time":0,"end_time":1.000123}]}"#;

#[test]
fn json_reads_stock_iperf3_messages() {
    use json::Value;
    let members = json::object_members(PARAMS_3_12.as_bytes()).expect("params");
    assert_eq!(members.len(), 9);
    assert_eq!(json::get(&members, "tcp"), Some(Value::Bool(true)));
    assert_eq!(json::get(&members, "time"), Some(Value::Number(1)));
    assert_eq!(json::get(&members, "len"), Some(Value::Number(131072)));
    assert_eq!(
        json::get(&members, "client_version"),
        Some(Value::String(b"3.12"))
    );
    assert_eq!(json::get(&members, "reverse"), None);

    let members = json::object_members(RESULTS_3_12.as_bytes()).expect("results");
    assert_eq!(
        json::get(&members, "cpu_util_total"),
        Some(Value::Number(2))
    );
    assert_eq!(json::get(&members, "streams"), Some(Value::Array));
    let pretty = "{\n\t\"a\":\t[ {\"b\" : null} , \"\\u00e9\\n\" ],\r\n \"c\": {} }";
    let members = json::object_members(pretty.as_bytes()).expect("whitespace");
    assert_eq!(json::get(&members, "c"), Some(Value::Object));
    assert_eq!(json::object_members(b" {} ").expect("empty"), vec![]);
}

#[test]
fn json_numbers_truncate_and_saturate_like_cjson_valueint() {
    let number = |text: &str| {
        let text = format!("{{\"n\":{text}}}");
        let members =
            json::object_members(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e:?}"));
        match json::get(&members, "n") {
            Some(json::Value::Number(value)) => value,
            other => panic!("{text}: {other:?}"),
        }
    };
    assert_eq!(number("0"), 0);
    assert_eq!(number("-7"), -7);
    assert_eq!(number("1e3"), 1000);
    assert_eq!(number("1.5E1"), 15);
    assert_eq!(number("-2.9"), -2);
    assert_eq!(number("0.5"), 0);
    assert_eq!(number("123e-2"), 1);
    assert_eq!(number("10000000000"), 10_000_000_000);
    assert_eq!(number("1e+16"), 10_000_000_000_000_000);
    assert_eq!(number("9e99"), i64::MAX);
    assert_eq!(number("99999999999999999999999"), i64::MAX);
    assert_eq!(number("-9e99"), -i64::MAX);
    assert_eq!(number("0e999999999"), 0);
}

#[test]
fn json_rejects_what_is_not_json_with_the_offset() {
    use json::Error;
    let error = |text: &str| json::object_members(text.as_bytes()).expect_err(text);
    assert_eq!(error("[1]"), Error::NotAnObject);
    assert_eq!(error(""), Error::NotAnObject);
    assert_eq!(error(r#"{"a":1,}"#), Error::Syntax(7));
    assert_eq!(error(r#"{"a":01}"#), Error::Syntax(6));
    assert_eq!(error(r#"{"a":1} x"#), Error::Syntax(8));
    assert_eq!(error(r#"{"a":1."#), Error::Syntax(7));
    assert_eq!(error(r#"{"a":-}"#), Error::Syntax(6));
    assert_eq!(error(r#"{"a":tru}"#), Error::Syntax(5));
    assert_eq!(error(r#"{"a":"x"#), Error::Syntax(7));
    assert_eq!(error(r#"{"a":"\x"}"#), Error::Syntax(7));
    assert_eq!(error(r#"{"a":"\u12g4"}"#), Error::Syntax(10));
    assert_eq!(error("{\"a\":\"\u{1}\"}"), Error::Syntax(6));
    assert_eq!(error(r#"{a:1}"#), Error::Syntax(1));
    assert_eq!(error(r#"{"a" 1}"#), Error::Syntax(5));
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(40), "]".repeat(40));
    assert!(matches!(error(&deep), Error::TooDeep(_)), "{deep}");
    let nested = format!("{{\"a\":{}{}}}", "[".repeat(15), "]".repeat(15));
    assert!(json::object_members(nested.as_bytes()).is_ok());
    let many: Vec<String> = (0..=json::MAX_MEMBERS)
        .map(|i| format!("\"k{i}\":{i}"))
        .collect();
    assert_eq!(
        error(&format!("{{{}}}", many.join(","))),
        Error::TooManyMembers
    );
}
