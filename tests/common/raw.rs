//! A raw-socket HTTP/1.1 client, for what reqwest will not send: a body written whole before
//! anything is read, bytes that are not HTTP, pipelined requests, a body that stalls or ends
//! early, headers sent a byte at a time.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One response as read off the socket.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A `100 Continue` came before it.
    pub continued: bool,
}

impl Answer {
    /// The JSON error code, when the body is the gateway's error JSON.
    pub fn code(&self) -> Option<String> {
        self.json().get("error").and_then(Value::as_str).map(str::to_string)
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A request as bytes: request line, headers (Content-Length added when `body` is given and
/// no Content-Length or Transfer-Encoding header is), blank line, body.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: gateway\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let framed = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding"));
    if !framed {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// `body` in chunked transfer encoding, in chunks of `size`.
pub fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / size * 8 + 8);
    for chunk in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_write_timeout(Some(Duration::from_secs(20))).expect("timeout");
    stream
}

/// Writes all of `bytes` (an error is returned, not a panic: a reset is what some cases test).
pub fn send(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes)?;
    stream.flush()
}

/// Writes `pieces` one by one with `pause` between them; stops at the first failed write.
pub fn trickle(stream: &mut TcpStream, pieces: &[Vec<u8>], pause: Duration) {
    for piece in pieces {
        if send(stream, piece).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
}

/// Half-closes the writing side: the server reads EOF.
pub fn finish(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
}

/// Reads up to `n` answers (skipping `100 Continue`, which marks the next one), until the
/// server closes, an error, or `timeout` in all.
pub fn answers(stream: &mut TcpStream, n: usize, timeout: Duration) -> Vec<Answer> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut continued = false;
    while out.len() < n {
        match parse(&buf) {
            Some((answer, used)) => {
                buf.drain(..used);
                if answer.status == 100 {
                    continued = true;
                } else {
                    out.push(Answer { continued, ..answer });
                    continued = false;
                }
                continue;
            }
            None if !read_more(stream, &mut buf, deadline) => break,
            None => {}
        }
    }
    out
}

/// Whether the server closed the connection (EOF or reset) within `timeout`, having sent
/// nothing (any byte it sends makes this false).
pub fn closed_silently(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = Vec::new();
    let deadline = Instant::now() + timeout;
    while read_more(stream, &mut buf, deadline) {}
    buf.is_empty() && Instant::now() < deadline
}

/// Reads what is there into `buf`; false at EOF, on an error or past the deadline.
fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let _ = stream.set_read_timeout(Some(left));
    let mut chunk = [0u8; 64 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => true,
        Err(_) => false,
    }
}

/// One complete response at the start of `buf`, and the bytes it takes.
fn parse(buf: &[u8]) -> Option<(Answer, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(buf).ok()? else { return None };
    let status = response.code?;
    let headers: Vec<(String, String)> =
        response.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let body = buf.get(head..head + length)?.to_vec();
    Some((Answer { status, headers, body, continued: false }, head + length))
}
