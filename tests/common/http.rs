//! The one HTTP/1.1 test client. Every test sends its requests and reads
//! the answers through it: well-formed ones with [`request`] and
//! [`try_request`], and the malformed, slow, endless or never-sent ones a
//! real client library would refuse to make with a [`RawConnection`],
//! which writes whatever bytes a test gives it.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a read waits for the daemon unless a test says otherwise.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`RawConnection::answer_within`] looks for an answer.
const POLL: Duration = Duration::from_millis(50);

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request over a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"))
}

/// Like [`request`], but returns I/O errors (the daemon may be dying).
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut c = RawConnection::open(addr)?;
    c.send_bytes(&request_bytes(addr, method, path, headers, body))?;
    c.read_response()
}

/// The bytes of a well-formed request to `addr`: the request line, `Host`,
/// `Connection: close` and `Content-Length`, then `headers` as given (a
/// test may add any, a second `Content-Length` too), then `body`.
pub fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one answer on a connection a test opened and wrote on itself
/// (until the daemon closes it); see [`RawConnection::read_response`].
pub fn read_response(s: &mut TcpStream) -> io::Result<Response> {
    RawConnection::adopt(s.try_clone()?).read_response()
}

/// A connection on which a test writes whatever bytes it likes (a
/// malformed head, a body one byte at a time, nothing at all) and reads
/// what the daemon answers.
pub struct RawConnection {
    stream: TcpStream,
    /// The read timeout set on `stream` (`None`: reads wait forever).
    read_timeout: Option<Duration>,
    /// Everything the daemon sent so far.
    received: Vec<u8>,
    /// The daemon closed (or reset) the connection: nothing more comes.
    closed: bool,
    /// The error that ended the connection, when it was not a clean close.
    close_error: Option<io::Error>,
}

impl RawConnection {
    /// Connects to `addr`; reads wait at most 30 s for the daemon.
    pub fn open(addr: SocketAddr) -> io::Result<RawConnection> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(RawConnection::adopt(stream))
    }

    /// A connection over `stream`, with its read timeout as it is.
    fn adopt(stream: TcpStream) -> RawConnection {
        RawConnection {
            read_timeout: stream.read_timeout().ok().flatten(),
            stream,
            received: Vec::new(),
            closed: false,
            close_error: None,
        }
    }

    /// How long a read waits for the daemon before it is an error.
    pub fn set_read_timeout(&mut self, limit: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(limit))?;
        self.read_timeout = Some(limit);
        Ok(())
    }

    /// Writes `bytes` as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Shuts the write side: the daemon reads an end of stream.
    pub fn half_close(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// Shuts both sides (unblocks a writer stuck on a daemon that stopped
    /// reading).
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Runs `send` on another thread with a second handle on this
    /// connection, so that this one can read while that one writes.
    pub fn send_in_background<T: Send + 'static>(
        &self,
        send: impl FnOnce(RawConnection) -> T + Send + 'static,
    ) -> io::Result<JoinHandle<T>> {
        let writer = RawConnection::adopt(self.stream.try_clone()?);
        Ok(thread::spawn(move || send(writer)))
    }

    /// Sends `bytes` from another thread while reading the answer here (a
    /// daemon that answers before it has read everything is then no
    /// deadlock), shuts the write side after them when `half_close`, and
    /// reads until the daemon closes; see [`RawConnection::read_answer`].
    pub fn send_and_read_answer(
        &mut self,
        bytes: Vec<u8>,
        half_close: bool,
    ) -> io::Result<Option<Response>> {
        let writer = self.send_in_background(move |mut w| {
            let _ = w.send_bytes(&bytes);
            if half_close {
                let _ = w.half_close();
            }
        })?;
        let answer = self.read_answer();
        self.close();
        let _ = writer.join();
        answer
    }

    /// Reads until the daemon closes the connection and returns its
    /// answer; `None` when it closed without one. A read that waits longer
    /// than the read timeout is an error; a reset ends the answer like a
    /// close (the daemon answered, then closed with request bytes unread).
    pub fn read_answer(&mut self) -> io::Result<Option<Response>> {
        while !self.closed {
            if let Err(e) = self.read_once() {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "no end of answer within {:?}; got {:?}",
                        self.read_timeout.unwrap_or_default(),
                        excerpt(&self.received)
                    ),
                ));
            }
        }
        parse(&self.received, true)
    }

    /// [`RawConnection::read_answer`], where closing without an answer is
    /// an error.
    pub fn read_response(&mut self) -> io::Result<Response> {
        match self.read_answer()? {
            Some(r) => Ok(r),
            None => Err(self
                .close_error
                .take()
                .unwrap_or_else(|| io::Error::other("closed without an answer"))),
        }
    }

    /// Reads for up to `wait`, and less once a whole answer is there or
    /// the daemon closed: the answer, if a whole one came (see
    /// [`RawConnection::is_closed`] for a close without one).
    pub fn answer_within(&mut self, wait: Duration) -> io::Result<Option<Response>> {
        let start = Instant::now();
        self.stream.set_read_timeout(Some(POLL))?;
        while !self.closed
            && start.elapsed() < wait
            && matches!(parse(&self.received, false), Ok(None))
        {
            // An error is a read that timed out: nothing came yet.
            let _ = self.read_once();
        }
        self.stream.set_read_timeout(self.read_timeout)?;
        parse(&self.received, self.closed)
    }

    /// Whether the daemon has closed (or reset) the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Looks, without waiting, whether the daemon has ended this
    /// connection: closed it, or answered (an answer such as 408 ends it).
    pub fn closed_by_daemon(&mut self) -> io::Result<bool> {
        self.stream.set_nonblocking(true)?;
        let mut buf = [0u8; 512];
        let ended = match self.stream.read(&mut buf) {
            Ok(0) => {
                self.closed = true;
                true
            }
            Ok(n) => {
                self.received.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => {
                self.closed = true;
                self.close_error = Some(e);
                true
            }
        };
        let _ = self.stream.set_nonblocking(false);
        Ok(ended)
    }

    /// One read into `received`. A read that times out is the one error;
    /// the end of the stream, or any other error (a reset), closes.
    fn read_once(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => self.closed = true,
            Ok(n) => self.received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(e);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                self.closed = true;
                self.close_error = Some(e);
            }
        }
        Ok(())
    }
}

/// The answer in `raw`, the bytes read so far; `closed`: nothing more
/// comes. Interim answers (100 Continue) are skipped. `None`: no whole
/// answer yet, or, once closed, none at all. An error: a garbled answer,
/// or, once closed, one cut short of its `Content-Length`.
fn parse(mut raw: &[u8], closed: bool) -> io::Result<Option<Response>> {
    while raw.starts_with(b"HTTP/1.1 1") {
        match raw.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => raw = &raw[end + 4..],
            None => break,
        }
    }
    if raw.is_empty() {
        return Ok(None);
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if closed {
            Err(io::Error::other(format!(
                "no header end in {:?}",
                excerpt(raw)
            )))
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let response = Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    let length = response
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok());
    match (length, closed) {
        (Some(n), _) if response.body.len() >= n => Ok(Some(response)),
        (Some(n), true) => Err(io::Error::other(format!(
            "answer cut short: {} of {n} body bytes in {:?}",
            response.body.len(),
            excerpt(raw)
        ))),
        // Without a length the body ends when the connection does.
        (None, true) => Ok(Some(response)),
        (_, false) => Ok(None),
    }
}

/// The start of `raw` as text, for error messages.
fn excerpt(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned()
}
