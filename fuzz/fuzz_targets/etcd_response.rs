//! What an etcd endpoint (or anything listening where one should be)
//! answers the arbiter's etcd backend: the HTTP/1.1 response
//! (`arbiter::etcd::parse_http_response`: status line, headers,
//! Content-Length, chunked bodies), its JSON range body
//! (`arbiter::etcd::parse_kvs`) and the record value inside it
//! (`arbiter::etcd::parse_value`). Bit 0 of the first byte skips HTTP and
//! feeds the bytes to the JSON and value decoders directly.
#![no_main]
use arbiter::etcd::{format_value, parse_http_response, parse_kvs, parse_value};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "/lockstep/vm/7";

fn body(bytes: &[u8]) {
    if let Ok(record) = parse_value(KEY, bytes) {
        let again = parse_value(KEY, format_value(&record).as_bytes()).ok();
        assert_eq!(again, Some(record), "a record does not format back");
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) {
        let _ = parse_kvs("fuzz:2379", KEY, &json);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 != 0 {
        body(rest);
        return;
    }
    if let Ok((_status, content)) = parse_http_response(rest) {
        assert!(content.len() <= rest.len());
        body(&content);
    }
});
