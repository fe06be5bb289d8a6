//! A headless Chromium driven over W3C WebDriver (Debian's `chromium` and
//! `chromium-driver`), for the dashboard tests.
//!
//! The protocol is JSON over HTTP and these tests use eight of its
//! endpoints, so they are sent here by hand rather than through a WebDriver
//! crate: fantoccini brings the `webdriver` crate and with it
//! two versions of ICU (about a hundred crates to build on two cores), and
//! chromiumoxide generates all of the DevTools protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// What WebDriver calls an element reference's key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser window under chromedriver; closed (and chromedriver killed)
/// on drop.
pub struct Browser {
    /// chromedriver, which starts and ends Chromium.
    driver: Child,
    /// Where chromedriver listens.
    addr: SocketAddr,
    /// The WebDriver session: one browser.
    session: String,
    /// Chromium's profile, thrown away afterwards.
    _profile: tempfile::TempDir,
}

/// Where a program is on `PATH`, if it is.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

impl Browser {
    /// Starts headless Chromium with a window of `width`×`height`. Fails,
    /// saying what to install, when Chromium or chromedriver is missing,
    /// unless `INLETD_SKIP_BROWSER=1` asks to skip (then `None`).
    pub fn start(width: u32, height: u32) -> Option<Browser> {
        Browser::launch(width, height, false)
    }

    /// The same, as a phone's screen: headless Chromium keeps a desktop
    /// window at least 500 px wide, so a phone is emulated.
    pub fn phone(width: u32, height: u32) -> Option<Browser> {
        Browser::launch(width, height, true)
    }

    fn launch(width: u32, height: u32, phone: bool) -> Option<Browser> {
        let (Some(driver), Some(chromium)) = (
            which("chromedriver"),
            which("chromium").or_else(|| which("chromium-browser")),
        ) else {
            let why = "this test drives a headless Chromium: install Debian's `chromium` and \
                       `chromium-driver` (apt-get install -y chromium chromium-driver; .ci/run does)";
            if std::env::var("INLETD_SKIP_BROWSER").as_deref() == Ok("1") {
                eprintln!("SKIPPED (INLETD_SKIP_BROWSER=1): {why}");
                return None;
            }
            panic!("{why}, or set INLETD_SKIP_BROWSER=1 to skip it");
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let started = Instant::now();
        while call(addr, "GET", "/status", None).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("chromedriver did not answer on {addr} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let args = vec![
            "--headless=new".to_owned(),
            // As root (CI) Chromium's sandbox cannot start.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            // The machine has no internet: no calls home at start.
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut options = json!({"binary": chromium, "args": args});
        if phone {
            options["mobileEmulation"] = json!({"deviceMetrics": {
                "width": width, "height": height, "pixelRatio": 1.0, "touch": true,
            }});
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
        }}});
        let answer = match call(addr, "POST", "/session", Some(&capabilities)) {
            Ok(answer) => answer,
            Err(e) => {
                let _ = child.kill();
                panic!("chromedriver could not start Chromium: {e}");
            }
        };
        let session = answer["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Some(Browser {
            driver: child,
            addr,
            session,
            _profile: profile,
        })
    }

    fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        call(self.addr, method, &path, body).unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    /// Opens `url` and waits for the page to load.
    pub fn open(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page
    /// and answers what it returns.
    pub fn run(&self, script: &str, args: &[Value]) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// The text the page shows in the first element `selector` matches
    /// (`None` when there is none).
    pub fn text(&self, selector: &str) -> Option<String> {
        self.run(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            &[json!(selector)],
        )
        .as_str()
        .map(str::to_owned)
    }

    /// Whether the first element `selector` matches is shown.
    pub fn visible(&self, selector: &str) -> bool {
        self.run(
            "const e = document.querySelector(arguments[0]); \
             return !!e && e.getClientRects().length > 0;",
            &[json!(selector)],
        ) == json!(true)
    }

    /// Clicks the element `selector` matches, as a user would: WebDriver
    /// refuses an element that is hidden or covered.
    pub fn click(&self, selector: &str) {
        let id = self.element(selector);
        self.command("POST", &format!("/element/{id}/click"), Some(&json!({})));
    }

    /// Types `text` into the element `selector` matches.
    pub fn type_into(&self, selector: &str, text: &str) {
        let id = self.element(selector);
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// Answers "OK" to the dialog the page opened (`confirm()`), and
    /// answers the dialog's text.
    pub fn accept_dialog(&self) -> String {
        let text = self.command("GET", "/alert/text", None);
        self.command("POST", "/alert/accept", Some(&json!({})));
        text.as_str().unwrap_or_default().to_owned()
    }

    fn element(&self, selector: &str) -> String {
        let found = self.command(
            "POST",
            "/element",
            Some(&json!({"using": "css selector", "value": selector})),
        );
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}: {found}"))
            .to_owned()
    }

    /// Saves what the window shows as a PNG.
    pub fn screenshot(&self, path: &Path) {
        let encoded = self.command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Polls the page until `check` (given the browser) holds, failing
    /// with `what` and the page's text past `limit`.
    pub fn wait_for(&self, limit: Duration, what: &str, mut check: impl FnMut(&Browser) -> bool) {
        let started = Instant::now();
        while !check(self) {
            if started.elapsed() > limit {
                let text = self.text("body").unwrap_or_default();
                panic!("timed out after {limit:?} waiting for: {what}\npage text:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium; then chromedriver.
        let _ = call(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One WebDriver call: its `value`, or the error it answered.
/// chromedriver keeps a connection open whatever `Connection` says, so
/// the answer is read to its `Content-Length`, not to the end.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let exchange = || -> std::io::Result<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut answer = vec![0; length];
        reader.read_exact(&mut answer)?;
        Ok((status, answer))
    };
    let (status, answer) = exchange().map_err(|e| e.to_string())?;
    let answer: Value = serde_json::from_slice(&answer).map_err(|e| format!("{status}: {e}"))?;
    if status != 200 {
        return Err(format!("{status}: {}", answer["value"]));
    }
    Ok(answer["value"].clone())
}
