//! A real `redis-server` for the tests of the Redis sink: on a free loopback
//! port with a temp data dir, SIGKILLed on drop, plus a minimal blocking
//! RESP2 client so that a test can check what the daemon stored without a
//! Redis crate, and can pause, kill and restart the server under it.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start or a restart may take before the test fails.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long a command may wait for its reply (a paused server never answers).
const REPLY_LIMIT: Duration = Duration::from_secs(5);

/// How the server is configured, to test the daemon against each setting.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass`, to test that the daemon authenticates.
    pub password: Option<String>,
    /// An AOF with `appendfsync always`, so that data survives `kill9` + `restart`.
    pub appendonly: bool,
}

/// A `redis-server` process owned by one test; SIGKILLed on drop. Its port,
/// options and dir (AOF and log) are kept across restarts.
pub struct RedisServer {
    child: Child,
    program: PathBuf,
    port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
}

/// One RESP2 reply, so that tests can assert on what Redis holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A status reply such as `OK` or `PONG`.
    Simple(String),
    /// An error reply such as `WRONGTYPE …`; `command` returns it, not panics.
    Error(String),
    /// An integer reply, e.g. from `LLEN` or `XLEN`.
    Int(i64),
    /// A bulk string; `None` is Redis's nil (a missing key).
    Bulk(Option<Vec<u8>>),
    /// An array; `None` is Redis's nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The integer of an `Int` reply, for counts.
    pub fn as_int(&self) -> Option<i64> {
        let Reply::Int(n) = self else { return None };
        Some(*n)
    }

    /// The text of a `Simple` or non-nil UTF-8 `Bulk` reply, for values.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Bulk(Some(bytes)) => String::from_utf8(bytes.clone()).ok(),
            _ => None,
        }
    }

    /// The items of a non-nil `Array` reply, for `LRANGE`, `XRANGE` and such.
    pub fn as_array(&self) -> Option<&[Reply]> {
        let Reply::Array(Some(items)) = self else {
            return None;
        };
        Some(items)
    }
}

impl RedisServer {
    /// Starts a server and waits until it answers PING. When `redis-server`
    /// is not installed, fails the test saying so, unless
    /// `INLETD_SKIP_PRIVILEGED=1` asks to skip it: then `None`, and the
    /// caller returns (see `cannot_run_here`).
    pub fn start(options: RedisOptions) -> Option<RedisServer> {
        let Some(program) = which("redis-server") else {
            super::cannot_run_here(
                "redis-server is not installed: apt-get install -y redis-server",
            );
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("no free loopback port for redis-server")
            .port();
        let dir = tempfile::tempdir().expect("cannot create a temp dir for redis-server");
        let child = spawn(&program, port, &options, dir.path());
        let mut server = RedisServer {
            child,
            program,
            port,
            options,
            dir,
        };
        server.wait_ready();
        Some(server)
    }

    /// The URL to configure the daemon with (password percent-encoded).
    pub fn url(&self) -> String {
        match &self.options.password {
            Some(password) => format!("redis://:{}@127.0.0.1:{}/", escape(password), self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The port, for tests that build their own URL or connection.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one command (AUTH first when a password is set) and returns its
    /// reply, `Reply::Error` included; panics, with the log, on I/O errors.
    pub fn command(&self, args: &[&str]) -> Reply {
        self.try_command(args).unwrap_or_else(|e| {
            panic!(
                "redis {args:?} on port {} failed: {e}; redis log:\n{}",
                self.port,
                self.log_text()
            )
        })
    }

    /// Like `command`, but returns I/O errors, for when the server is paused or down.
    pub fn try_command(&self, args: &[&str]) -> io::Result<Reply> {
        self.roundtrip(args, REPLY_LIMIT)
    }

    /// SIGSTOP: the server accepts connections but never answers, like a hung Redis.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT: undoes `pause`.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// SIGKILL, and waits for the exit: Redis crashing under the daemon.
    pub fn kill9(&mut self) {
        // An error here means it already exited, which is what is wanted.
        let _ = self.child.kill();
        self.child.wait().expect("waiting for redis-server");
    }

    /// Starts the server again on the same port, dir and options (so an AOF
    /// is reloaded), SIGKILLing the old one first if it still runs.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = spawn(&self.program, self.port, &self.options, self.dir.path());
        self.wait_ready();
    }

    /// The server's log so far (its stderr included), for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log"))
            .unwrap_or_else(|e| format!("(no redis.log: {e})"))
    }

    /// Waits until PING answers PONG; when the process exits meanwhile (its
    /// port not yet free after a kill), starts it again; fails past 10 s.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let pong = self.roundtrip(&["PING"], Duration::from_secs(1));
            if matches!(pong, Ok(Reply::Simple(ref s)) if s == "PONG") {
                return;
            }
            if started.elapsed() > START_LIMIT {
                panic!(
                    "redis-server on port {} did not answer PING within {START_LIMIT:?} \
                     (last answer: {pong:?}); log:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                self.child = spawn(&self.program, self.port, &self.options, self.dir.path());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One command over a fresh connection, after AUTH when there is a password.
    fn roundtrip(&self, args: &[&str], limit: Duration) -> io::Result<Reply> {
        send(&mut self.open(limit)?, args)
    }

    /// A connection, authenticated when the server has a password.
    fn open(&self, limit: Duration) -> io::Result<BufReader<TcpStream>> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let stream = TcpStream::connect_timeout(&addr, limit)?;
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        let mut conn = BufReader::new(stream);
        if let Some(password) = &self.options.password {
            let answer = send(&mut conn, &["AUTH", password])?;
            if answer != Reply::Simple("OK".to_owned()) {
                return Err(io::Error::other(format!("AUTH was answered {answer:?}")));
            }
        }
        Ok(conn)
    }

    /// One connection kept open, for a test that asks thousands of times
    /// a second: a connection a command would go through the machine's
    /// ephemeral ports, which the other tests need too.
    pub fn connect(&self) -> Connection {
        let conn = self.open(REPLY_LIMIT).unwrap_or_else(|e| {
            panic!(
                "connecting to redis on port {} failed: {e}; redis log:\n{}",
                self.port,
                self.log_text()
            )
        });
        Connection { conn }
    }

    /// Sends a signal by name with kill(1).
    fn signal(&self, name: &str) {
        let pid = self.child.id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("cannot run kill(1)");
        assert!(status.success(), "kill -{name} {pid} (redis-server) failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `redis-server` with everything on its command line; its stderr
/// (a bad option, before it opens its log) goes into its log too.
fn spawn(program: &Path, port: u16, options: &RedisOptions, dir: &Path) -> Child {
    let log = dir.join("redis.log");
    let stderr = File::options().create(true).append(true).open(&log);
    let port = port.to_string();
    let mut settings = vec![
        ("port", port.as_str()),
        ("bind", "127.0.0.1"),
        ("save", ""),
        ("daemonize", "no"),
        ("protected-mode", "no"),
        ("appendonly", if options.appendonly { "yes" } else { "no" }),
    ];
    if options.appendonly {
        settings.push(("appendfsync", "always"));
    }
    if let Some(password) = &options.password {
        settings.push(("requirepass", password));
    }
    let mut cmd = Command::new(program);
    cmd.arg("--dir").arg(dir).arg("--logfile").arg(&log);
    for (name, value) in settings {
        cmd.arg(format!("--{name}")).arg(value);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.expect("cannot create redis.log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

/// Writes `args` as a RESP2 array of bulk strings and reads the reply.
/// A connection to the server, kept for many commands ([`RedisServer::connect`]).
pub struct Connection {
    conn: BufReader<TcpStream>,
}

impl Connection {
    /// Sends one command and reads its reply; panics if the server does not answer.
    pub fn command(&mut self, args: &[&str]) -> Reply {
        send(&mut self.conn, args).unwrap_or_else(|e| panic!("redis {args:?} failed: {e}"))
    }
}

fn send(conn: &mut BufReader<TcpStream>, args: &[&str]) -> io::Result<Reply> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    conn.get_mut().write_all(&out)?;
    read_reply(conn)
}

/// Reads one RESP2 reply (arrays recursively).
fn read_reply(conn: &mut impl BufRead) -> io::Result<Reply> {
    let mut raw = Vec::new();
    conn.read_until(b'\n', &mut raw)?;
    let line = String::from_utf8_lossy(&raw);
    let bad = || io::Error::other(format!("not a RESP2 reply line: {line:?}"));
    let body = line.strip_suffix("\r\n").ok_or_else(bad)?;
    let (kind, rest) = body.split_at_checked(1).ok_or_else(bad)?;
    let number = || rest.parse::<i64>().map_err(|_| bad());
    Ok(match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut bytes = vec![0; len + 2];
                conn.read_exact(&mut bytes)?;
                bytes.truncate(len);
                Reply::Bulk(Some(bytes))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(len) => Reply::Array(Some(
                (0..len)
                    .map(|_| read_reply(conn))
                    .collect::<io::Result<_>>()?,
            )),
        },
        _ => return Err(bad()),
    })
}

/// Where a program is on `PATH`, if it is.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Percent-encodes all but unreserved characters, for a password in a URL.
fn escape(text: &str) -> String {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let each = |b: u8| match keep(b) {
        true => char::from(b).to_string(),
        false => format!("%{b:02X}"),
    };
    text.bytes().map(each).collect()
}
