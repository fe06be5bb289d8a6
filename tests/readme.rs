//! The README's shell examples are true. Every line of its ```sh blocks is
//! claimed by exactly one runner below, which does what a reader would do
//! with it and compares the result with the answer the README shows under
//! it (`# …` lines; `…` stands for anything). A line no runner claims fails
//! [`every_readme_sh_line_is_run_by_exactly_one_runner`], so an example
//! added without a way to run it breaks the build.
//!
//! | README section | runner |
//! |---|---|
//! | the top (`cargo run --release`, `cargo test`) | [`Runner::Newcomer`]: the binary on embedded defaults; `.ci/run` runs `cargo test` |
//! | "Try it" (`curl`) | [`Runner::TryIt`]: each request sent to a fresh daemon |
//! | "Command line" (`inletd …`) | [`Runner::CommandLine`]: each line through `sh`, against a daemon |
//! | "Several instances" | [`Runner::SeveralInstances`]: the loop through `sh` with a real `redis-server`, then its `curl` lines |
//! | "Packages and systemd" | [`Runner::PackageTest`] and [`Runner::SystemdTest`]: CI's scripts read these lines out of the README and run them (`--readme-plan` says which) |
//!
//! The `curl` lines are not handed to a shell: curl may not be installed,
//! and what curl would send is plain. Each is split like a shell does
//! (quotes, backslash-newline, a trailing comment) and read for curl's
//! `-X`, `-H`, `-d`, `-i` and the URL, then sent as curl sends it: `-d`
//! without `-X` is a POST, and no `-d` means no body and no
//! `Content-Length`.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command as Process, Output, Stdio};
use std::time::{Duration, Instant};

use common::redis::{RedisOptions, RedisServer};
use common::{Daemon, Response, read_response, try_request};
use serde_json::Value;

const README: &str = include_str!("../README.md");

/// One command of a ```sh block: a line with its continuations, and the
/// `# ` answer lines right under it.
#[derive(Debug, Clone)]
struct Command {
    /// Its first line's number in README.md (1-based).
    line: usize,
    /// The `#` or `##` heading it is under.
    section: String,
    /// Which ```sh block of its section it is in (0-based).
    block: usize,
    /// The command as written, trailing comment included.
    text: String,
    /// The `# ` lines right under it, without the `# `.
    answers: Vec<String>,
}

impl Command {
    /// The command without its trailing comment (as the CI scripts read it).
    fn bare(&self) -> &str {
        match self.text.find(" #") {
            Some(at) => self.text[..at].trim_end(),
            None => self.text.trim_end(),
        }
    }

    /// Its trailing comment, without the `#`.
    fn comment(&self) -> &str {
        self.text
            .find(" #")
            .map_or("", |at| self.text[at + 2..].trim())
    }

    /// `README.md:LINE: text`, for failure messages.
    fn at(&self) -> String {
        format!("README.md:{}: {}", self.line, self.text)
    }
}

/// Every command of every ```sh block of the README. Answer lines are the
/// `# ` lines right under a command; other `#` lines (after a blank line or
/// at a block's start) are comments for the reader, run by nobody.
fn commands(readme: &str) -> Vec<Command> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut blocks_in_section = 0;
    let mut fence: Option<&str> = None;
    let mut last_was_command = false;
    let mut lines = readme.lines().enumerate().peekable();
    while let Some((index, line)) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => {
                    if info.trim() == "sh" {
                        blocks_in_section += 1;
                    }
                    Some(info.trim())
                }
            };
            last_was_command = false;
            continue;
        }
        match fence {
            None => {
                if let Some(heading) = line.strip_prefix("# ").or_else(|| line.strip_prefix("## "))
                {
                    section = heading.trim().to_owned();
                    blocks_in_section = 0;
                }
                continue;
            }
            Some("sh") => {}
            Some(_) => continue,
        }
        if line.trim().is_empty() {
            last_was_command = false;
            continue;
        }
        if line.starts_with('#') {
            if let (true, Some(answer)) = (last_was_command, line.strip_prefix("# ")) {
                let command: &mut Command = out.last_mut().expect("a command");
                command.answers.push(answer.to_owned());
            }
            continue;
        }
        // Continuation lines: a trailing backslash, or an open quote.
        let mut text = line.to_owned();
        while text.ends_with('\\') || open_quote(&text) {
            match lines.peek() {
                Some((_, next)) if !next.starts_with("```") => {
                    text.push('\n');
                    text.push_str(next);
                    lines.next();
                }
                _ => panic!("README.md:{}: a quote left open: {text}", index + 1),
            }
        }
        out.push(Command {
            line: index + 1,
            section: section.clone(),
            block: blocks_in_section - 1,
            text,
            answers: Vec::new(),
        });
        last_was_command = true;
    }
    out
}

/// Whether `text` ends inside a quote, as a shell reads it: a `#` that
/// starts a word outside quotes begins a comment (whose apostrophes do not
/// count) running to the end of its line.
fn open_quote(text: &str) -> bool {
    let mut quote = None;
    let mut word_start = true;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '#') if word_start => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            (None, '\'' | '"') => quote = Some(c),
            (None, '\\') | (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
        word_start = quote.is_none() && c.is_whitespace();
    }
    quote.is_some()
}

/// Who runs a line of the README's ```sh blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// [`a_newcomers_two_commands_run_the_daemon_and_every_test`].
    Newcomer,
    /// [`every_curl_example_of_try_it_answers_what_it_shows`].
    TryIt,
    /// [`every_command_line_example_runs_and_prints_what_it_shows`].
    CommandLine,
    /// [`three_instances_started_as_shown_share_one_redis`].
    SeveralInstances,
    /// `scripts/package-test.sh` (CI), the lines its `--readme-plan` names.
    PackageTest,
    /// `scripts/systemd-test.sh` (CI), the lines its `--readme-plan` names.
    SystemdTest,
}

const RUNNERS: [Runner; 6] = [
    Runner::Newcomer,
    Runner::TryIt,
    Runner::CommandLine,
    Runner::SeveralInstances,
    Runner::PackageTest,
    Runner::SystemdTest,
];

/// The README commands a CI script runs, as its `--readme-plan` prints
/// them (the same lookup it runs them by).
fn script_plan(script: &str) -> Vec<String> {
    let out = Process::new("bash")
        .arg(script)
        .arg("--readme-plan")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {script} --readme-plan: {e}"));
    assert!(
        out.status.success(),
        "bash {script} --readme-plan failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a UTF-8 plan")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What the CI scripts claim, asked once.
struct Plans {
    package_test: Vec<String>,
    systemd_test: Vec<String>,
}

impl Plans {
    fn ask() -> Plans {
        Plans {
            package_test: script_plan("scripts/package-test.sh"),
            systemd_test: script_plan("scripts/systemd-test.sh"),
        }
    }
}

impl Runner {
    /// Whether this runner runs `c`.
    fn claims(self, c: &Command, plans: &Plans) -> bool {
        match self {
            Runner::Newcomer => {
                c.section == "inletd" && ["cargo run --release", "cargo test"].contains(&c.bare())
            }
            Runner::TryIt => c.section == "Try it" && c.text.starts_with("curl "),
            Runner::CommandLine => c.section == "Command line" && c.text.starts_with("inletd "),
            // The whole section: the loop's lines (here-document included)
            // are run as one script, the curl lines after it one by one.
            Runner::SeveralInstances => c.section == "Several instances",
            Runner::PackageTest => {
                c.section == "Packages and systemd"
                    && plans.package_test.iter().any(|l| l == c.bare())
            }
            Runner::SystemdTest => {
                c.section == "Packages and systemd"
                    && plans.systemd_test.iter().any(|l| l == c.bare())
            }
        }
    }

    /// The README commands this runner runs, in order.
    fn commands(self, plans: &Plans) -> Vec<Command> {
        let all = commands(README);
        let mine: Vec<Command> = all.into_iter().filter(|c| self.claims(c, plans)).collect();
        assert!(!mine.is_empty(), "no README command for {self:?}");
        mine
    }
}

/// For the runners that need no script's plan.
fn no_plans() -> Plans {
    Plans {
        package_test: Vec::new(),
        systemd_test: Vec::new(),
    }
}

/// A maintainer adds an example to the README: unless some runner runs
/// it, the build fails naming its line. And no line is run twice.
#[test]
fn every_readme_sh_line_is_run_by_exactly_one_runner() {
    let plans = Plans::ask();
    let all = commands(README);
    assert!(
        all.len() >= 30,
        "the README's sh blocks were not read: {all:?}"
    );
    let mut problems = Vec::new();
    for c in &all {
        let runners: Vec<Runner> = RUNNERS
            .into_iter()
            .filter(|r| r.claims(c, &plans))
            .collect();
        match runners.as_slice() {
            [_] => {}
            [] => problems.push(format!("no runner runs {}", c.at())),
            many => problems.push(format!("{many:?} all run {}", c.at())),
        }
    }
    // A script's plan naming a line the README no longer has is stale.
    for (script, plan) in [
        ("package-test.sh", &plans.package_test),
        ("systemd-test.sh", &plans.systemd_test),
    ] {
        for line in plan {
            if !all.iter().any(|c| c.bare() == line) {
                problems.push(format!("{script} runs a line the README lacks: {line}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_readme_is_read_as_a_shell_reader_reads_it() {
    let text = "# Title\n\n```sh\ncmd one   # what it does\n# answer\n\n# a comment\ncurl -d 'a\nb' x\n# {}\n```\n\n## Next\n\n```toml\n# not sh\n```\n\n```sh\nfor i in 1; do\n  echo $i\ndone\n```\n";
    let got = commands(text);
    let seen: Vec<(usize, &str, usize, &str, Vec<String>)> = got
        .iter()
        .map(|c| {
            (
                c.line,
                c.section.as_str(),
                c.block,
                c.bare(),
                c.answers.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (4, "Title", 0, "cmd one", vec!["answer".to_owned()]),
            (8, "Title", 0, "curl -d 'a\nb' x", vec!["{}".to_owned()]),
            (20, "Next", 0, "for i in 1; do", vec![]),
            (21, "Next", 0, "  echo $i", vec![]),
            (22, "Next", 0, "done", vec![]),
        ]
    );
    assert_eq!(got[0].comment(), "what it does");
    assert!(!open_quote("inletd stats   # the summary's table"));
    assert!(open_quote("curl -d '{\n  \"a\": 1"));
    assert!(!open_quote("echo \"it's\" 'a # b'"));
}

// ---------------------------------------------------------------------------
// The newcomer's two commands.

/// A newcomer runs `cargo run --release` in a fresh directory: the daemon
/// starts with no file, no flag and no variable, on the address and data
/// directory the README's comment names, answers `/health`, and drains and
/// exits 0 on SIGTERM. (This runs the test build of the same binary:
/// `cargo run` inside `cargo test` would build and lock the target dir.)
/// `cargo test` is what CI runs, as it is, and nothing there skips tests.
#[test]
fn a_newcomers_two_commands_run_the_daemon_and_every_test() {
    let commands = Runner::Newcomer.commands(&no_plans());
    let run = commands
        .iter()
        .find(|c| c.bare() == "cargo run --release")
        .expect("cargo run --release");
    let defaults = run
        .comment()
        .split_once("embedded defaults: ")
        .and_then(|(_, rest)| rest.split_once(", data in "))
        .unwrap_or_else(|| {
            panic!(
                "the comment should say `embedded defaults: ADDR, data in DIR`: {}",
                run.at()
            )
        });
    let addr: SocketAddr = defaults.0.parse().expect("the comment's address");
    let data_dir = defaults.1.trim();
    if let Err(e) = TcpListener::bind(addr) {
        panic!(
            "{addr} is taken on this machine ({e}): the README's `cargo run --release` \
             listens there; stop what holds it and run again"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Process::new(env!("CARGO_BIN_EXE_inletd"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INLETD_") {
            cmd.env_remove(key);
        }
    }
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = cmd
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn inletd");
    let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    let started = Instant::now();
    let health = loop {
        if let Ok(r) = try_request(addr, "GET", "/health", &[], b"") {
            break r;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "inletd with no arguments exited ({status}); log:\n{}",
                log()
            );
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!(
                "inletd with no arguments never answered on {addr}; log:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (health.status, health.json()),
        (200, serde_json::json!({"status": "ok"}))
    );
    assert!(
        dir.path().join(data_dir).join("db").is_file(),
        "no sled store in {data_dir} of the working directory"
    );
    common::signal(&child, "TERM");
    let mut exit = None;
    while started.elapsed() < Duration::from_secs(60) {
        exit = child.try_wait().unwrap();
        if exit.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(exit) = exit else {
        let _ = child.kill();
        panic!("inletd did not drain and exit on SIGTERM; log:\n{}", log());
    };
    assert!(exit.success(), "SIGTERM: {exit}; log:\n{}", log());

    let test = commands
        .iter()
        .find(|c| c.bare() == "cargo test")
        .expect("cargo test");
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == test.bare()),
        ".ci/run does not run the README's `{}` as it is",
        test.bare()
    );
    for skip in ["INLETD_SKIP_PRIVILEGED", "INLETD_SKIP_BROWSER"] {
        assert!(
            !ci.contains(skip),
            ".ci/run sets {skip}: the README's `cargo test` runs every test"
        );
    }
    // The runners of the packaging lines are CI's too.
    for script in [
        "bash scripts/package-test.sh",
        "bash scripts/systemd-test.sh",
    ] {
        assert!(
            ci.lines().any(|l| l.trim().starts_with(script)),
            ".ci/run does not run {script}"
        );
    }
}

// ---------------------------------------------------------------------------
// curl.

/// Splits a command line as a POSIX shell does for these examples:
/// whitespace, single and double quotes, backslash-newline, and a `#`
/// starting a word begins a comment.
fn shell_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            '#' if !in_word => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        q => word.push(q),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// What curl sends for these words, and whether `-i` asked for the head.
#[derive(Debug)]
struct CurlRequest {
    method: String,
    /// `host:port` as written in the URL.
    authority: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
    show_head: bool,
}

fn curl_request(words: &[String]) -> CurlRequest {
    assert_eq!(words.first().map(String::as_str), Some("curl"), "{words:?}");
    let mut method = None;
    let mut headers = Vec::new();
    let mut body = None;
    let mut show_head = false;
    let mut url = None;
    let mut it = words.iter().skip(1);
    while let Some(w) = it.next() {
        match w.as_str() {
            "-X" => method = it.next().cloned(),
            "-H" => {
                let h = it.next().expect("-H takes a header");
                let (k, v) = h.split_once(':').expect("a header is Name: value");
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            "-d" => body = it.next().cloned(),
            "-i" => show_head = true,
            other if !other.starts_with('-') => url = Some(other.to_owned()),
            other => panic!("the README uses a curl option this test does not know: {other}"),
        }
    }
    let url = url.expect("a URL");
    let rest = url.strip_prefix("http://").unwrap_or(&url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    CurlRequest {
        method: method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_owned()),
        authority: authority.to_owned(),
        path: if path.is_empty() { "/" } else { path }.to_owned(),
        headers,
        body,
        show_head,
    }
}

/// Sends `request` to `addr` as curl would.
fn send(request: &CurlRequest, addr: SocketAddr) -> Response {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: curl/8\r\nAccept: */*\r\nConnection: close\r\n",
        request.method, request.path, request.authority
    );
    let mut has_type = false;
    for (k, v) in &request.headers {
        has_type |= k.eq_ignore_ascii_case("content-type");
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = &request.body {
        if !has_type {
            head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| {
        panic!(
            "{} {}: cannot connect to {addr}: {e}",
            request.method, request.path
        )
    });
    s.write_all(head.as_bytes()).unwrap();
    if let Some(body) = &request.body {
        s.write_all(body.as_bytes()).unwrap();
    }
    read_response(&mut s).unwrap()
}

/// `…` in a JSON answer of the README (`[…]`, `{…}`) matches anything.
fn json_matches(expected: &Value, got: &Value) -> bool {
    match (expected, got) {
        (Value::String(s), _) if s == "…" => true,
        (Value::Object(e), Value::Object(g)) => {
            e.len() == g.len()
                && e.iter()
                    .all(|(k, v)| g.get(k).is_some_and(|gv| json_matches(v, gv)))
        }
        (Value::Array(e), Value::Array(g)) => {
            e.len() == g.len() && e.iter().zip(g).all(|(a, b)| json_matches(a, b))
        }
        (e, g) => e == g,
    }
}

fn expected_json(text: &str) -> Value {
    let text = text.replace("[…]", "\"…\"").replace("{…}", "\"…\"");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the README's answer {text}: {e}"))
}

/// Where the answer to `example` differs from what the README shows under
/// it (`HTTP/1.1 202 Accepted` with `-i`, `400 {…}`, `{…}`); none when it
/// is the same. No answer shown: any 2xx.
fn answer_mismatch(example: &Command, request: &CurlRequest, r: &Response) -> Option<String> {
    let got: Value = match serde_json::from_slice(&r.body) {
        Ok(v) => v,
        Err(e) => return Some(format!("not JSON ({e}): {}", r.text())),
    };
    if example.answers.is_empty() && !(200..300).contains(&r.status) {
        return Some(format!("{} {}", r.status, r.text()));
    }
    for line in &example.answers {
        if let Some(status_line) = line.strip_prefix("HTTP/1.1 ") {
            assert!(request.show_head, "a status line without -i: {line}");
            let code: u16 = status_line[..3].parse().unwrap();
            if r.status != code {
                return Some(format!(
                    "status {} (the README shows {code}): {got}",
                    r.status
                ));
            }
            continue;
        }
        let (status, json) = match line.split_once(' ') {
            Some((code, rest)) if code.len() == 3 && code.parse::<u16>().is_ok() => {
                (code.parse::<u16>().ok(), rest)
            }
            _ => (None, line.as_str()),
        };
        if let Some(code) = status
            && r.status != code
        {
            return Some(format!(
                "status {} (the README shows {code}): {got}",
                r.status
            ));
        }
        if !json_matches(&expected_json(json), &got) {
            return Some(format!("the README shows: {json}\nthe daemon said: {got}"));
        }
    }
    None
}

/// The user followed "Try it" with the daemon running: every `curl`
/// example, sent in order to a fresh daemon, answers what the README shows.
#[test]
fn every_curl_example_of_try_it_answers_what_it_shows() {
    let examples = Runner::TryIt.commands(&no_plans());
    assert!(
        examples.len() >= 7,
        "the README's curl examples were not found: {examples:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    for example in &examples {
        let request = curl_request(&shell_words(&example.text));
        assert_eq!(
            request.authority,
            "localhost:5015",
            "{}: the daemon of \"Try it\" is on localhost:5015",
            example.at()
        );
        if request.path.starts_with("/stats") {
            // "What was processed": what came before has been.
            d.wait_processed(Duration::from_secs(10));
        }
        let r = send(&request, d.addr);
        if let Some(why) = answer_mismatch(example, &request, &r) {
            panic!("{}\n{why}", example.at());
        }
    }
}

#[test]
fn commands_split_as_a_shell_splits_them() {
    let words = shell_words(
        "curl -i -X POST http://localhost:5015/x \\\n  -H \"Content-Type: application/json\" \\\n  -d '{\n  \"a\": 1\n}'   # a comment",
    );
    assert_eq!(
        words,
        vec![
            "curl",
            "-i",
            "-X",
            "POST",
            "http://localhost:5015/x",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{\n  \"a\": 1\n}"
        ]
    );
    assert_eq!(shell_words("a b#c 'd # e'"), vec!["a", "b#c", "d # e"]);
}

// ---------------------------------------------------------------------------
// The command line.

/// `…` in a line of text matches any text; an answer line that is `…`
/// alone matches any number of output lines.
fn text_matches(expected: &[String], got: &[&str]) -> bool {
    match expected.split_first() {
        None => got.is_empty(),
        Some((first, rest)) if first == "…" => {
            (0..=got.len()).any(|skip| text_matches(rest, &got[skip..]))
        }
        Some((first, rest)) => got
            .split_first()
            .is_some_and(|(line, more)| line_matches(first, line) && text_matches(rest, more)),
    }
}

fn line_matches(pattern: &str, line: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[test]
fn answers_with_ellipses_match_what_they_stand_for() {
    let lines = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let shown = lines(&[
        "total events    5",
        "processed p50   … ms",
        "…",
        "event type  count",
    ]);
    assert!(text_matches(
        &shown,
        &[
            "total events    5",
            "processed p50   250 ms",
            "x",
            "",
            "event type  count"
        ]
    ));
    assert!(text_matches(
        &shown,
        &[
            "total events    5",
            "processed p50   1.5 ms",
            "event type  count"
        ]
    ));
    assert!(!text_matches(
        &shown,
        &[
            "total events    6",
            "processed p50   250 ms",
            "event type  count"
        ]
    ));
    assert!(!text_matches(
        &shown,
        &[
            "total events    5",
            "processed p50   250 ms",
            "event type  count",
            "more"
        ]
    ));
    assert!(line_matches("a…b…c", "a--b--c") && !line_matches("a…b…c", "a--c"));
    assert!(!line_matches("ab…ba", "aba"));
}

/// A ```NAME fenced block of the README that is the only one with that
/// info string: the example files the command-line examples read.
fn fenced_file(info: &str) -> String {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in README.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(i)) if i.trim() == info => current = Some(String::new()),
            (Some(text), Some(_)) => {
                found.push(std::mem::take(text));
                current = None;
            }
            (Some(text), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    assert_eq!(found.len(), 1, "the README should have one ```{info} block");
    found.remove(0)
}

/// An operator whose dashboard sink is down works through "Command line"
/// in a directory holding the README's `events.csv` and `events.jsonl`:
/// each line, run by `sh` as typed (with this build's `inletd` first on
/// `PATH`, and the daemon's address in `INLETD_BIND`), exits 0 and prints
/// what the README shows under it. Between two lines the daemon has
/// processed what came before (a person types slower than it works), so
/// the DLQ holds what the sink refused.
#[test]
fn every_command_line_example_runs_and_prints_what_it_shows() {
    let examples = Runner::CommandLine.commands(&no_plans());
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "max_retries = 0\n[[sinks]]\nname = \"dashboard\"\ntype = \"http\"\nurl = \"http://127.0.0.1:9/ingest\"\n",
    );
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("events.csv"), fenced_file("csv")).unwrap();
    std::fs::write(work.join("events.jsonl"), fenced_file("jsonl")).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_inletd")).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(bin.to_owned()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    for example in &examples {
        d.wait_processed(Duration::from_secs(20));
        let mut sh = Process::new("sh");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("INLETD_") {
                sh.env_remove(key);
            }
        }
        let Output {
            status,
            stdout,
            stderr,
        } = sh
            .arg("-c")
            .arg(&example.text)
            .current_dir(&work)
            .env("PATH", &path)
            .env("INLETD_CONFIG", &d.config_path)
            .env("INLETD_BIND", d.addr.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run sh");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
        assert!(
            status.success(),
            "{}\nexited {status}:\n{printed}",
            example.at()
        );
        let got: Vec<&str> = printed.lines().collect();
        if !example.answers.is_empty() {
            assert!(
                text_matches(&example.answers, &got),
                "{}\nthe README shows:\n{}\nit printed:\n{printed}",
                example.at(),
                example.answers.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Several instances.

/// Three daemons started by the README's loop, SIGKILLed when the test
/// ends however it ends (they are the shell's children, not ours).
struct Started(Vec<u32>);

impl Drop for Started {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Process::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// An operator tries "Several instances" on one host: the README's loop,
/// run by `sh` as written, starts three daemons on :5011–:5013 sharing one
/// Redis; then its `curl` lines answer what it shows (a figure from
/// another instance once it is published, within 10 s). What differs on a
/// test machine is substituted, and only that: Redis's port (a
/// `redis-server` of the test's own), `/tmp/` (a temp dir), and `inletd`
/// found on `PATH` as this build. The ports 5011–5013 are kept: when they
/// are taken the test fails saying so.
#[test]
fn three_instances_started_as_shown_share_one_redis() {
    let examples = Runner::SeveralInstances.commands(&no_plans());
    let (start, curls): (Vec<&Command>, Vec<&Command>) =
        examples.iter().partition(|c| c.block == 0);
    assert!(
        curls.iter().all(|c| c.text.starts_with("curl ")),
        "after the loop, \"Several instances\" shows curl lines only: {curls:?}"
    );
    assert!(!curls.is_empty(), "no curl line after the loop");
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let ports = [5011, 5012, 5013];
    for port in ports {
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            panic!("127.0.0.1:{port} is taken on this machine ({e}): the README's loop binds it");
        }
    }

    let first = start.first().expect("the loop").line;
    let last = start.last().unwrap().line;
    let block: String = README
        .lines()
        .skip(first - 1)
        .take(last - first + 1)
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let tmp = format!("{}/", dir.path().display());
    let mut script = block.clone();
    for (shown, here) in [
        ("127.0.0.1:6379", format!("127.0.0.1:{}", redis.port())),
        ("/tmp/", tmp),
    ] {
        assert!(
            block.contains(shown),
            "the loop no longer has {shown}:\n{block}"
        );
        script = script.replace(shown, &here);
    }
    let pids = dir.path().join("pids");
    script.push_str(&format!("jobs -p >'{}'\n", pids.display()));
    let log = dir.path().join("daemons.log");
    let bin = Path::new(env!("CARGO_BIN_EXE_inletd")).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(bin.to_owned()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut sh = Process::new("sh");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INLETD_") {
            sh.env_remove(key);
        }
    }
    let status = sh
        .arg("-c")
        .arg(&script)
        .env("PATH", &path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("sh.err")).unwrap())
        .status()
        .expect("run sh");
    let started = Started(
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().expect("a pid"))
            .collect(),
    );
    let logs = || {
        format!(
            "{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("sh.err")).unwrap_or_default()
        )
    };
    assert!(status.success(), "sh ran the loop: {status}\n{}", logs());
    assert_eq!(
        started.0.len(),
        3,
        "three daemons in the background\n{}",
        logs()
    );

    let begun = Instant::now();
    for port in ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            let health = try_request(addr, "GET", "/health", &[], b"");
            if let Ok(r) = &health
                && r.status == 200
                && r.json()["redis"]["state"] == "up"
            {
                break;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(30),
                ":{port} is not up with Redis: {health:?}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    for example in curls {
        let request = curl_request(&shell_words(&example.text));
        let port = request
            .authority
            .strip_prefix("localhost:")
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| ports.contains(p))
            .unwrap_or_else(|| panic!("{}: not one of the three instances", example.at()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let asked = Instant::now();
        loop {
            let r = send(&request, addr);
            let Some(why) = answer_mismatch(example, &request, &r) else {
                break;
            };
            // The deployment's figures come with each instance's next
            // publish: a read may ask again. A write is sent once.
            if request.method != "GET" || asked.elapsed() > Duration::from_secs(10) {
                panic!("{}\n{why}\n{}", example.at(), logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(started);
}
