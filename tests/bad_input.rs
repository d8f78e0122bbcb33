//! Broken and hostile requests against the real gateway binary (a child process, real
//! ClickHouse and Redis), each with the exact answer it must get: malformed and oversized
//! bodies, bombs, bad headers and credentials, wrong methods and paths, and raw-socket abuse
//! (slow headers and bodies, framing lies, pipelining, header floods, idle connections).
//! Every request is written whole before its answer is read, as many clients do. Afterwards the
//! gateway must be healthy, its peak memory bounded, and exactly the good events stored.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::raw::{self, Answer};
use common::{Process, RedisServer, clickhouse, command, config, eventually, free_port, http, migrate};
use serde_json::{Value, json};

const KEY: &str = "good-key";
const LIMIT: usize = 1024 * 1024;
const MAX_EVENTS: usize = 100;
/// Short timeouts keep the slow-client cases quick.
const BODY_TIMEOUT_MS: u64 = 1_000;
const HEADER_TIMEOUT_MS: u64 = 1_000;
/// The gateway's peak resident memory after every case: about 30 MiB is measured, none of the
/// 16 MiB bodies or 200 MiB bombs may be held whole.
const MAX_RSS_KIB: u64 = 128 * 1024;

fn redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(|| RedisServer::start("redis"))
}

/// How a case's bytes go out.
enum Send {
    /// Written at once, then the answers read.
    Whole(Vec<u8>),
    /// Written at once, then the writing side closed.
    WholeThenEof(Vec<u8>),
    /// Written piece by piece with a pause after each, then the answers read.
    Trickle(Vec<Vec<u8>>, Duration),
    /// Written from another thread while the answer is read (the server may stop reading).
    Concurrent(Vec<u8>),
}

/// What must come back.
enum Want {
    /// One answer with this status and JSON error code (`None`: hyper's own answer, no body).
    Error(u16, Option<&'static str>),
    /// One 200 with these counts.
    Batch { accepted: u64, duplicates: u64, rejected: u64 },
    /// Several answers, in order (pipelined requests).
    Answers(Vec<(u16, Option<&'static str>)>),
    /// The connection closed with no answer at all.
    Closed,
}

struct Case {
    name: &'static str,
    send: Send,
    want: Want,
    /// Event ids this case stores.
    stores: Vec<String>,
    /// A `100 Continue` must (true) or must not (false) precede the answer.
    continued: bool,
}

fn case(name: &'static str, send: Send, want: Want) -> Case {
    Case { name, send, want, stores: Vec::new(), continued: false }
}

impl Case {
    fn stores(mut self, ids: &[&str]) -> Self {
        self.stores = ids.iter().map(|s| s.to_string()).collect();
        self
    }

    fn continued(mut self) -> Self {
        self.continued = true;
        self
    }
}

/// The id of good event `n`.
fn id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// Good event `n`, as JSON.
fn good(n: u32) -> Value {
    json!({"event_id": id(n), "user_id": n, "event_type": "good", "payload": {"n": n}})
}

fn array(events: &[Value]) -> Vec<u8> {
    Value::Array(events.to_vec()).to_string().into_bytes()
}

/// `POST /v1/events` with the API key, `content_type` and `headers`.
fn post_as(content_type: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let auth = format!("Bearer {KEY}");
    let mut all = vec![("authorization", auth.as_str()), ("content-type", content_type)];
    all.extend_from_slice(headers);
    raw::request("POST", "/v1/events", &all, body)
}

fn post(body: &[u8]) -> Vec<u8> {
    post_as("application/json", &[], body)
}

fn post_gzip(body: &[u8]) -> Vec<u8> {
    post_as("application/json", &[("content-encoding", "gzip")], body)
}

fn whole(bytes: Vec<u8>) -> Send {
    Send::Whole(bytes)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// 200 MiB of zeros as 200 gzip members of 1 MiB each (gzip decoders read concatenated
/// members as one stream): a ~200 KiB bomb, built without compressing 200 MiB.
fn gzip_bomb() -> Vec<u8> {
    gzip(&vec![0u8; 1024 * 1024]).repeat(200)
}

/// `[{"payload": [[[…]]]}]`: `depth` nested arrays inside one field.
fn nested(depth: usize) -> Vec<u8> {
    format!(r#"[{{"user_id": 1, "payload": {}{}}}]"#, "[".repeat(depth), "]".repeat(depth)).into_bytes()
}

/// Well over the 1 MiB limit: a 16 MiB JSON array of one huge string, or 12 MiB of events.
fn oversized_array() -> Vec<u8> {
    format!(r#"[{{"user_id": 1, "payload": "{}"}}]"#, "x".repeat(16 * 1024 * 1024)).into_bytes()
}

fn oversized_ndjson() -> Vec<u8> {
    let line = format!("{}\n", json!({"user_id": 7, "event_type": "big", "payload": "y".repeat(1000)}));
    line.repeat(12 * 1024 * 1024 / line.len()).into_bytes()
}

fn cases() -> Vec<Case> {
    let mut c = body_cases();
    c.extend(encoding_cases());
    c.extend(event_cases());
    c.extend(header_cases());
    c.extend(route_cases());
    c.extend(socket_cases());
    c
}

/// Bodies that are not (acceptable) JSON.
fn body_cases() -> Vec<Case> {
    let bad = |name, body: &[u8]| case(name, whole(post(body)), Want::Error(400, Some("malformed_json")));
    vec![
        case(
            "a good batch",
            whole(post(&array(&[good(1), good(2)]))),
            Want::Batch { accepted: 2, duplicates: 0, rejected: 0 },
        )
        .stores(&[&id(1), &id(2)]),
        case(
            "one event, not in an array",
            whole(post(good(3).to_string().as_bytes())),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 0 },
        )
        .stores(&[&id(3)]),
        bad("truncated JSON", br#"[{"event_id": "00000000-0000-4000-8000-000000000099", "user_id": 1"#),
        bad("trailing garbage", br#"[{"user_id": 1}] garbage"#),
        bad("trailing comma", br#"[{"user_id": 1},]"#),
        bad("100,000 nested arrays at the top", &[b'['; 100_000]),
        bad("100,000 nested arrays in a field", &nested(100_000)),
        bad("invalid UTF-8", b"[{\"event_type\": \"\xff\xfe\"}]"),
        bad("a raw control character in a string", b"[{\"event_type\": \"a\x01b\"}]"),
        bad("a NUL byte", b"[{\"user_id\": 1}\x00]"),
        bad("an empty body", b""),
        bad("only whitespace", b"  \r\n "),
        bad("a bare string", br#""events""#),
        bad("a comment", b"[/* no */ {\"user_id\": 1}]"),
        bad("single quotes", b"[{'user_id': 1}]"),
        bad("NaN", br#"[{"user_id": NaN}]"#),
        case("an empty array", whole(post(b"[]")), Want::Batch { accepted: 0, duplicates: 0, rejected: 0 }),
        // Rejected alone and parked in the quarantine (quarantine = table, the default).
        case(
            "an NDJSON line that is not JSON",
            whole(post_as("application/x-ndjson", &[], format!("{}\n{{oops\n", good(92)).as_bytes())),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 1 },
        )
        .stores(&[&id(92)]),
        case(
            "an empty NDJSON body",
            whole(post_as("application/x-ndjson", &[], b"")),
            Want::Batch { accepted: 0, duplicates: 0, rejected: 0 },
        ),
        case(
            "too many events",
            whole(post(&array(&vec![json!({"user_id": 1}); MAX_EVENTS + 1]))),
            Want::Error(413, Some("too_many_events")),
        ),
    ]
}

/// Compression and media types.
fn encoding_cases() -> Vec<Case> {
    let mut corrupt = gzip(&array(&[good(90)]));
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    let zstd_bomb = zstd::encode_all(&vec![0u8; 200 * 1024 * 1024][..], 3).unwrap();
    vec![
        case(
            "a gzip bomb (200 MiB of zeros)",
            whole(post_gzip(&gzip_bomb())),
            Want::Error(413, Some("decompressed_body_too_large")),
        ),
        case(
            "a zstd bomb (200 MiB of zeros)",
            whole(post_as("application/json", &[("content-encoding", "zstd")], &zstd_bomb)),
            Want::Error(413, Some("decompressed_body_too_large")),
        ),
        case("corrupt gzip", whole(post_gzip(&corrupt)), Want::Error(400, Some("bad_encoding"))),
        case(
            "gzip claimed, plain JSON sent",
            whole(post_gzip(&array(&[good(91)]))),
            Want::Error(400, Some("bad_encoding")),
        ),
        case(
            "corrupt zstd",
            whole(post_as("application/json", &[("content-encoding", "zstd")], b"\x28\xb5\x2f\xfdgarbage")),
            Want::Error(400, Some("bad_encoding")),
        ),
        case(
            "gzip of invalid JSON",
            whole(post_gzip(&gzip(b"[{\"user_id\": }]"))),
            Want::Error(400, Some("malformed_json")),
        ),
        case(
            "a good gzip batch",
            whole(post_gzip(&gzip(&array(&[good(4)])))),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 0 },
        )
        .stores(&[&id(4)]),
        case(
            "Content-Encoding br",
            whole(post_as("application/json", &[("content-encoding", "br")], b"[]")),
            Want::Error(415, Some("unsupported_encoding")),
        ),
        case(
            "Content-Type text/plain",
            whole(post_as("text/plain", &[], b"[]")),
            Want::Error(415, Some("unsupported_media_type")),
        ),
        case(
            "no Content-Type",
            whole(raw::request("POST", "/v1/events", &[("authorization", &format!("Bearer {KEY}"))], b"[]")),
            Want::Error(415, Some("unsupported_media_type")),
        ),
        case(
            "application/json with a charset",
            whole(post_as("application/json; charset=utf-8", &[], &array(&[good(5)]))),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 0 },
        )
        .stores(&[&id(5)]),
    ]
}

/// Events that parse but do not fit the table: rejected one by one, the rest written.
fn event_cases() -> Vec<Case> {
    let one_bad = |name, bad: &str, n: u32| {
        let body = format!("[{bad}, {}]", good(n));
        case(name, whole(post(body.as_bytes())), Want::Batch { accepted: 1, duplicates: 0, rejected: 1 })
            .stores(&[&id(n)])
    };
    vec![
        one_bad("user_id a word", r#"{"user_id": "abc"}"#, 10),
        one_bad("user_id negative", r#"{"user_id": -1}"#, 11),
        one_bad("user_id 2^64", r#"{"user_id": 18446744073709551616}"#, 12),
        one_bad("user_id a fraction", r#"{"user_id": 1.5}"#, 13),
        one_bad("event_id not a UUID", r#"{"event_id": "not-a-uuid", "user_id": 1}"#, 14),
        one_bad("event_id a number", r#"{"event_id": 12, "user_id": 1}"#, 15),
        one_bad("event_ts not a time", r#"{"event_ts": "yesterday", "user_id": 1}"#, 16),
        one_bad("event_ts month 13", r#"{"event_ts": "2024-13-01T00:00:00Z", "user_id": 1}"#, 17),
        one_bad("event_ts before 1970", r#"{"event_ts": "1900-01-01 00:00:00", "user_id": 1}"#, 18),
        one_bad("event_ts an object", r#"{"event_ts": {"t": 1}, "user_id": 1}"#, 19),
        one_bad("an unknown field", r#"{"user_id": 1, "no_such_column": 1}"#, 20),
        one_bad("an event that is a number", r#"7"#, 22),
        case(
            "a lone surrogate escape",
            whole(post(format!(r#"[{{"event_type": "\ud800"}}, {}]"#, good(21)).as_bytes())),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 1 },
        )
        .stores(&[&id(21)]),
        case(
            "events that are not objects",
            whole(post(br#"[1, "a", null, [], true]"#)),
            Want::Batch { accepted: 0, duplicates: 0, rejected: 5 },
        ),
        case(
            "an event sent again",
            whole(post(&array(&[good(1)]))),
            Want::Batch { accepted: 0, duplicates: 1, rejected: 0 },
        ),
    ]
}

/// Headers the gateway reads: credentials, idempotency and producer offsets, the query.
fn header_cases() -> Vec<Case> {
    let body = array(&[good(30)]);
    let other = array(&[good(31)]);
    let no_key = |name, auth: Option<&str>, want| {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(auth.map(|a| ("authorization", a)));
        case(name, whole(raw::request("POST", "/v1/events", &headers, &body)), want)
    };
    let bad_header = |name, headers: &[(&str, &str)]| {
        case(name, whole(post_as("application/json", headers, &other)), Want::Error(400, Some("bad_header")))
    };
    let long_key = "k".repeat(256);
    vec![
        no_key("no API key", None, Want::Error(401, Some("unauthorized"))),
        no_key("a wrong API key", Some("Bearer nope"), Want::Error(403, Some("forbidden"))),
        no_key("Basic credentials", Some("Basic Z29vZC1rZXk6"), Want::Error(401, Some("unauthorized"))),
        bad_header("an empty Idempotency-Key", &[("idempotency-key", "")]),
        bad_header("a 256-byte Idempotency-Key", &[("idempotency-key", &long_key)]),
        bad_header("a non-ASCII Idempotency-Key", &[("idempotency-key", "cl\u{e9}")]),
        bad_header("X-Producer-Offset without X-Producer-Id", &[("x-producer-offset", "1")]),
        bad_header("X-Producer-Offset not a number", &[("x-producer-id", "p"), ("x-producer-offset", "one")]),
        // A producer's offset at 2^63 or above would turn negative as a Kafka replay mark.
        bad_header(
            "X-Producer-Offset above 2^63-1",
            &[("x-producer-id", "p"), ("x-producer-offset", "9223372036854775808")],
        ),
        // The Kafka front's replay marks: a producer that moved them could switch another's
        // replay look-ups off.
        bad_header(
            "X-Producer-Id under the gateway's own prefix",
            &[("x-producer-id", "buffergate-kafka/group/topic"), ("x-producer-offset", "1")],
        ),
        case(
            "a first Idempotency-Key",
            whole(post_as("application/json", &[("idempotency-key", "k-1")], &body)),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 0 },
        )
        .stores(&[&id(30)]),
        case(
            "the same key and body again",
            whole(post_as("application/json", &[("idempotency-key", "k-1")], &body)),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 0 },
        ),
        case(
            "the same key, another body",
            whole(post_as("application/json", &[("idempotency-key", "k-1")], &other)),
            Want::Error(422, Some("idempotency_key_reused")),
        ),
        case(
            "an unknown wait",
            whole(raw::request(
                "POST",
                "/v1/events?wait=maybe",
                &[("authorization", &format!("Bearer {KEY}")), ("content-type", "application/json")],
                &other,
            )),
            Want::Error(400, Some("bad_query")),
        ),
    ]
}

fn route_cases() -> Vec<Case> {
    let to = |method, path| raw::request(method, path, &[("authorization", &format!("Bearer {KEY}"))], b"");
    vec![
        case("GET /v1/events", whole(to("GET", "/v1/events")), Want::Error(405, Some("method_not_allowed"))),
        case("PUT /v1/events", whole(to("PUT", "/v1/events")), Want::Error(405, Some("method_not_allowed"))),
        case("DELETE /healthz", whole(to("DELETE", "/healthz")), Want::Error(405, Some("method_not_allowed"))),
        case("POST /v1/event", whole(to("POST", "/v1/event")), Want::Error(404, Some("not_found"))),
        case("a path escaping the root", whole(to("GET", "/../../etc/passwd")), Want::Error(404, Some("not_found"))),
        case(
            "the offsets of the gateway's own replay marks",
            whole(to("GET", "/v1/offsets/buffergate-kafka%2Fgroup%2Ftopic")),
            Want::Error(400, Some("bad_path")),
        ),
        case(
            "POST /admin/flush without a token",
            whole(to("POST", "/admin/flush")),
            Want::Error(401, Some("unauthorized")),
        ),
    ]
}

/// Framing, timing and volume abuse, below the application.
fn socket_cases() -> Vec<Case> {
    let good_request = post(&array(&[good(40)]));
    let head = |length: usize, extra: &[(&str, &str)]| {
        let auth = format!("Bearer {KEY}");
        let len = length.to_string();
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("content-length", len.as_str()),
        ];
        headers.extend_from_slice(extra);
        raw::request("POST", "/v1/events", &headers, b"")
    };
    let short_body = [head(100, &[]), br#"[{"user_id": 1}"#.to_vec()].concat();
    let chunked_head = {
        let auth = format!("Bearer {KEY}");
        let headers =
            [("authorization", auth.as_str()), ("content-type", "application/json"), ("transfer-encoding", "chunked")];
        raw::request("POST", "/v1/events", &headers, b"")
    };
    let mut pipelined = post(&array(&[good(41)]));
    pipelined.extend(post(&array(&[good(42)])));
    pipelined.extend_from_slice(b"\x00\x01 not http\r\n\r\n");
    let many_headers: Vec<(String, String)> = (0..200).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many_headers: Vec<(&str, &str)> = many_headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let slow_head = post(&array(&[good(98)])).into_iter().take(60).map(|b| vec![b]).collect();
    let oversized = oversized_array();
    let ndjson = oversized_ndjson();
    vec![
        case("a 16 MiB JSON array", whole(post(&oversized)), Want::Error(413, Some("body_too_large"))),
        case(
            "12 MiB of NDJSON events",
            whole(post_as("application/x-ndjson", &[], &ndjson)),
            Want::Error(413, Some("body_too_large")),
        ),
        case(
            "a 16 MiB chunked body",
            whole([chunked_head.clone(), raw::chunked(&oversized, 64 * 1024)].concat()),
            Want::Error(413, Some("body_too_large")),
        ),
        case(
            "16 MiB announced with Expect: 100-continue, body held back",
            whole(head(oversized.len(), &[("expect", "100-continue")])),
            Want::Error(413, Some("body_too_large")),
        ),
        case(
            "a good batch with Expect: 100-continue",
            whole(post_as("application/json", &[("expect", "100-continue")], &array(&[good(43)]))),
            Want::Batch { accepted: 1, duplicates: 0, rejected: 0 },
        )
        .stores(&[&id(43)])
        .continued(),
        case(
            "headers a byte at a time (slowloris)",
            Send::Trickle(slow_head, Duration::from_millis(300)),
            Want::Closed,
        ),
        case(
            "a body that stalls",
            Send::Trickle(vec![head(100, &[]), b"[{\"user_id\"".to_vec()], Duration::from_millis(10)),
            Want::Error(408, Some("body_timeout")),
        ),
        case(
            "a body shorter than its Content-Length, then EOF",
            Send::WholeThenEof(short_body),
            Want::Error(400, Some("body_read_failed")),
        ),
        case(
            "a body longer than its Content-Length",
            whole([good_request, b"\x00\x01garbage\r\n\r\n".to_vec()].concat()),
            Want::Answers(vec![(200, None), (400, None)]),
        )
        .stores(&[&id(40)]),
        case(
            "two good requests pipelined, then garbage",
            whole(pipelined),
            Want::Answers(vec![(200, None), (200, None), (400, None)]),
        )
        .stores(&[&id(41), &id(42)]),
        case(
            "a bad chunk size",
            whole([chunked_head, b"zz\r\n[]\r\n0\r\n\r\n".to_vec()].concat()),
            Want::Error(400, Some("body_read_failed")),
        ),
        case(
            "two different Content-Lengths",
            whole(raw::request("POST", "/v1/events", &[("content-length", "2"), ("content-length", "3")], b"[]")),
            Want::Error(400, None),
        ),
        case(
            "a Content-Length that is not a number",
            whole(raw::request("POST", "/v1/events", &[("content-length", "ten")], b"")),
            Want::Error(400, None),
        ),
        case(
            "not HTTP at all",
            whole(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03hello\r\n\r\n".to_vec()),
            Want::Error(400, None),
        ),
        case("200 headers", whole(raw::request("GET", "/healthz", &many_headers, b"")), Want::Error(431, None)),
        case(
            "a 1 MiB header",
            Send::Concurrent(raw::request("GET", "/healthz", &[("x-big", &"b".repeat(1024 * 1024))], b"")),
            Want::Error(431, None),
        ),
    ]
}

/// Runs one case on a fresh connection; returns what went wrong, if anything.
fn run(addr: SocketAddr, case: &Case) -> Result<(), String> {
    let mut stream = raw::connect(addr);
    let wait = Duration::from_secs(15);
    match &case.send {
        Send::Whole(bytes) => raw::send(&mut stream, bytes).map_err(|e| format!("writing the request: {e}"))?,
        Send::WholeThenEof(bytes) => {
            raw::send(&mut stream, bytes).map_err(|e| format!("writing the request: {e}"))?;
            raw::finish(&stream);
        }
        Send::Trickle(pieces, pause) => raw::trickle(&mut stream, pieces, *pause),
        Send::Concurrent(bytes) => {
            let mut writer = stream.try_clone().unwrap();
            let bytes = bytes.clone();
            std::thread::spawn(move || raw::send(&mut writer, &bytes));
        }
    }
    let expected = match &case.want {
        Want::Closed => {
            return if raw::closed_silently(&mut stream, wait) {
                Ok(())
            } else {
                Err("expected a silent close".into())
            };
        }
        Want::Error(status, code) => vec![(*status, *code)],
        Want::Batch { .. } => vec![(200, None)],
        Want::Answers(list) => list.clone(),
    };
    let answers = raw::answers(&mut stream, expected.len(), wait);
    check(case, &expected, &answers)
}

fn check(case: &Case, expected: &[(u16, Option<&str>)], answers: &[Answer]) -> Result<(), String> {
    let got: Vec<(u16, Option<String>)> = answers.iter().map(|a| (a.status, a.code())).collect();
    let want: Vec<(u16, Option<String>)> = expected.iter().map(|(s, c)| (*s, c.map(str::to_string))).collect();
    if got != want {
        return Err(format!("got {got:?}, want {want:?}: {:?}", answers.iter().map(Answer::json).collect::<Vec<_>>()));
    }
    if answers[0].continued != case.continued {
        return Err(format!("100 Continue sent: {}, expected {}", answers[0].continued, case.continued));
    }
    if let Want::Batch { accepted, duplicates, rejected } = case.want {
        let body = answers[0].json();
        let counts = (
            body["accepted"].as_u64(),
            body["duplicates"].as_u64(),
            body["rejected"].as_array().map(|r| r.len() as u64),
        );
        if counts != (Some(accepted), Some(duplicates), Some(rejected)) {
            return Err(format!("counts {counts:?}: {body}"));
        }
    }
    Ok(())
}

/// 200 connections that send nothing: the gateway keeps answering while they are open and
/// closes each one once the header timeout has passed.
fn idle_connections(addr: SocketAddr) {
    let mut idle: Vec<_> = (0..200).map(|_| raw::connect(addr)).collect();
    let mut probe = raw::connect(addr);
    raw::send(&mut probe, &raw::request("GET", "/healthz", &[], b"")).unwrap();
    let answer = raw::answers(&mut probe, 1, Duration::from_secs(5));
    assert_eq!(answer.first().map(|a| a.status), Some(200), "healthz with 200 idle connections open");
    let started = Instant::now();
    for stream in &mut idle {
        assert!(raw::closed_silently(stream, Duration::from_secs(10)), "an idle connection is closed");
    }
    assert!(started.elapsed() < Duration::from_millis(HEADER_TIMEOUT_MS * 5), "closed after the header timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_hostile_requests_get_exact_answers() {
    let ch = clickhouse();
    let db = ch.fresh_database("bad_input");
    let mut config = config(ch, &db);
    let port = free_port();
    config.http.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.idempotency.redis_url = redis().url.clone();
    config.auth.api_keys = format!("producer={KEY}");
    config.auth.admin_token = "admin-token".into();
    config.http.max_body_bytes = LIMIT;
    config.http.max_decompressed_bytes = LIMIT;
    config.http.max_events_per_request = MAX_EVENTS;
    config.http.body_timeout_ms = BODY_TIMEOUT_MS;
    config.http.header_timeout_ms = HEADER_TIMEOUT_MS;
    config.http.body_drain_timeout_ms = 5_000;
    migrate(&config).await;
    let dir = common::scratch("bad_input");
    let gateway = Process::spawn(command(&config, &["serve"]), &dir.join("gateway.log"));
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "the gateway to be ready", || {
        let url = format!("{url}/readyz");
        async move { http().get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    let addr: SocketAddr = config.http.listen;

    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let started = Instant::now();
        let result = tokio::task::block_in_place(|| run(addr, case));
        if let Err(why) = result {
            failures.push(format!("{}: {why}", case.name));
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{} took {:?}", case.name, started.elapsed());
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    tokio::task::block_in_place(|| idle_connections(addr));

    // Still healthy, and a good request still works.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(http().get(format!("{url}{path}")).send().await.unwrap().status(), 200, "{path}");
    }
    let response = http().post(format!("{url}/v1/events")).bearer_auth(KEY).json(&[good(99)]).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let peak = common::peak_rss_kib(gateway.pid);
    eprintln!("the gateway's peak RSS: {peak} KiB");
    assert!(peak < MAX_RSS_KIB, "peak RSS {peak} KiB");

    // Exactly the good events, once each.
    let mut expected: BTreeSet<String> = cases.iter().flat_map(|c| c.stores.iter().cloned()).collect();
    expected.insert(id(99));
    ch.exec(&format!("OPTIMIZE TABLE `{db}`.`{}`", config.table.buffer_table)).await;
    let table = format!("`{db}`.`{}`", config.table.destination_table);
    let rows = ch.rows(&format!("SELECT toString(event_id) AS id FROM {table} ORDER BY id")).await;
    let stored: Vec<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(stored, expected.into_iter().collect::<Vec<_>>(), "exactly the good events, once each");
}

/// Sends `GET path` on `stream` and reads its answer; `None` when the connection was closed
/// without one.
fn get(stream: &mut std::net::TcpStream, path: &str) -> Option<Answer> {
    raw::send(stream, &raw::request("GET", path, &[], b"")).ok()?;
    raw::answers(stream, 1, Duration::from_secs(10)).into_iter().next()
}

/// A gateway holding `max_connections` connections closes the next one at once, unanswered,
/// keeps serving the ones it holds, takes a new one as soon as one of them leaves, and counts
/// what it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once() {
    const MAX: usize = 16;
    let ch = clickhouse();
    let db = ch.fresh_database("connection_limit");
    let mut config = config(ch, &db);
    config.http.max_connections = MAX;
    migrate(&config).await;
    let gateway = common::Gateway::start(config).await;
    gateway.wait_ready().await;
    let addr: SocketAddr = gateway.url.trim_start_matches("http://").parse().unwrap();
    tokio::task::block_in_place(|| {
        let mut held = Vec::new();
        loop {
            let mut stream = raw::connect(addr);
            let Some(answer) = get(&mut stream, "/healthz") else { break };
            assert_eq!(answer.status, 200);
            held.push(stream);
            assert!(held.len() <= MAX, "{} connections served at once", held.len());
        }
        // The readiness probe's connection may still have held a slot for a moment.
        assert!(held.len() >= MAX - 1, "refused with only {} connections open", held.len());
        for stream in &mut held {
            assert_eq!(get(stream, "/healthz").map(|a| a.status), Some(200), "a held connection still served");
        }
        held.truncate(held.len() - 1);
        let answer = (0..50).find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            get(&mut raw::connect(addr), "/metrics")
        });
        let metrics = String::from_utf8(answer.expect("a slot freed by a leaving client is taken").body).unwrap();
        let refused = common::sample(&metrics, "buffergate_http_connections_refused_total");
        assert!(refused.is_some_and(|n| n >= 1.0), "refused connections counted: {refused:?}");
    });
    gateway.stop().await;
}
