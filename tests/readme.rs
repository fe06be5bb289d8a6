//! The README's examples are true. A newcomer copies the `curl` lines of
//! its `sh` blocks, in order, against a freshly started daemon, and gets
//! the answers the README shows under them (`# HTTP/1.1 202 Accepted`,
//! `# 400 {…}`, `# {…}`; `…` stands for anything).
//!
//! The commands are not handed to a shell: curl may not be installed, and
//! what curl would send is plain. Each is split like a shell does (quotes,
//! backslash-newline) and read for curl's `-X`, `-H`, `-d`, `-i` and the
//! URL, then sent as curl sends it: `-d` without `-X` is a POST, and no
//! `-d` means no body and no `Content-Length`.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{Daemon, read_response};
use serde_json::Value;

/// One `curl` line of the README and the answer shown under it.
#[derive(Debug)]
struct Example {
    /// The command as written (for failure messages).
    command: String,
    /// The `# ` lines right under it, without the `# `.
    expected: Vec<String>,
}

/// Every `curl` command in the README's `sh` blocks, with its answer.
fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut lines = readme.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh || !line.starts_with("curl ") {
            continue;
        }
        // Continuation lines: a trailing backslash, or an open quote.
        let mut command = line.to_owned();
        while command.ends_with('\\') || command.matches('\'').count() % 2 == 1 {
            let Some(next) = lines.next() else { break };
            command.push('\n');
            command.push_str(next);
        }
        let mut expected = Vec::new();
        while let Some(next) = lines.peek() {
            match next.strip_prefix("# ") {
                Some(answer) => {
                    expected.push(answer.to_owned());
                    lines.next();
                }
                None => break,
            }
        }
        out.push(Example { command, expected });
    }
    out
}

/// Splits a command line as a POSIX shell does for these examples:
/// whitespace, single and double quotes, backslash-newline.
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
struct CurlRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
    show_head: bool,
}

fn curl_request(words: &[String]) -> CurlRequest {
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
    let path = rest
        .strip_prefix("localhost:5015")
        .unwrap_or_else(|| panic!("an example for another host: {url}"));
    CurlRequest {
        method: method.unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_owned()),
        path: if path.is_empty() { "/" } else { path }.to_owned(),
        headers,
        body,
        show_head,
    }
}

/// `…` in a JSON answer of the README (`[…]`, `{…}`) matches anything.
fn matches(expected: &Value, got: &Value) -> bool {
    match (expected, got) {
        (Value::String(s), _) if s == "…" => true,
        (Value::Object(e), Value::Object(g)) => {
            e.len() == g.len()
                && e.iter()
                    .all(|(k, v)| g.get(k).is_some_and(|gv| matches(v, gv)))
        }
        (Value::Array(e), Value::Array(g)) => {
            e.len() == g.len() && e.iter().zip(g).all(|(a, b)| matches(a, b))
        }
        (e, g) => e == g,
    }
}

fn expected_json(text: &str) -> Value {
    let text = text.replace("[…]", "\"…\"").replace("{…}", "\"…\"");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the README's answer {text}: {e}"))
}

/// The user followed the README from the top: every `curl` example, sent
/// in order to a fresh daemon, answers what the README shows.
#[test]
fn every_curl_example_in_the_readme_answers_what_it_shows() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let examples = examples(&readme);
    assert!(
        examples.len() >= 7,
        "the README's curl examples were not found: {examples:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    for example in &examples {
        let request = curl_request(&shell_words(&example.command));
        if request.path.starts_with("/stats") {
            // "What was processed": what came before has been.
            d.wait_processed(Duration::from_secs(10));
        }
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: curl/8\r\nAccept: */*\r\nConnection: close\r\n",
            request.method, request.path, d.addr
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
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        if let Some(body) = &request.body {
            s.write_all(body.as_bytes()).unwrap();
        }
        let r = read_response(&mut s).unwrap();
        let got: Value = serde_json::from_str(&r.text())
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", example.command, r.text()));
        if example.expected.is_empty() {
            assert!(
                (200..300).contains(&r.status),
                "{}: {} {}",
                example.command,
                r.status,
                r.text()
            );
        }
        for line in &example.expected {
            if let Some(status_line) = line.strip_prefix("HTTP/1.1 ") {
                assert!(request.show_head, "a status line without -i: {line}");
                let code: u16 = status_line[..3].parse().unwrap();
                assert_eq!(r.status, code, "{}: {}", example.command, r.text());
                continue;
            }
            let (status, json) = match line.split_once(' ') {
                Some((code, rest)) if code.len() == 3 && code.parse::<u16>().is_ok() => {
                    (code.parse::<u16>().ok(), rest)
                }
                _ => (None, line.as_str()),
            };
            if let Some(code) = status {
                assert_eq!(r.status, code, "{}: {}", example.command, r.text());
            }
            let expected = expected_json(json);
            assert!(
                matches(&expected, &got),
                "{}\nthe README shows: {json}\nthe daemon said: {got}",
                example.command
            );
        }
    }
}

#[test]
fn commands_split_as_a_shell_splits_them() {
    let words = shell_words(
        "curl -i -X POST http://localhost:5015/x \\\n  -H \"Content-Type: application/json\" \\\n  -d '{\n  \"a\": 1\n}'",
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
}
