//! Arbitrary signature headers, bodies and clocks for each scheme against a
//! fixed key.
//!
//! Input, one field a line (the rest is the body, byte for byte):
//!
//! ```text
//! scheme      standard | github | stripe (anything else: by its first byte)
//! now         Unix seconds; `~N` means the timestamp line plus N
//! webhook-id  `<none>` for an absent header
//! timestamp   webhook-timestamp (`<none>` for absent)
//! signature   the scheme's signature header; `{SIG}` is replaced by the
//!             correct MAC for this id/timestamp/body (base64 for Standard
//!             Webhooks, hex otherwise), `{BAD}` by the MAC of a different
//!             body, `{TS}` by the timestamp line
//! body...
//! ```
//!
//! Properties: nothing panics (here or in `Verifier::new` with the id line
//! as a secret); a pass implies the header carries, in the documented
//! format, the MAC computed with the key over exactly what the scheme signs
//! (recomputed here with `hmac`, not with inletd's code); the canonical
//! header (`v1,{SIG}`, `sha256={SIG}`, `t={TS},v1={SIG}`) passes when the
//! timestamp is fresh; and
//! `inletd::signature::sign` produces that same canonical header.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use inletd::signature::{Scheme, SignedHeaders, Verifier, sign};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

/// The Standard Webhooks spec's example secret.
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// GitHub's documented example secret.
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const STRIPE_SECRET: &str = "whsec_test";

const TOLERANCE_SECS: u64 = 300;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(6, |b| *b == b'\n');
    let mut next = || String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (scheme_line, now_line, id_line, ts_line, sig_line) =
        (next(), next(), next(), next(), next());
    let body = data
        .splitn(6, |b| *b == b'\n')
        .nth(5)
        .unwrap_or_default()
        .to_vec();

    for scheme in [Scheme::StandardWebhooks, Scheme::Github, Scheme::Stripe] {
        let _ = Verifier::new(scheme, &id_line);
    }

    let scheme = match scheme_line.as_str() {
        "standard" => Scheme::StandardWebhooks,
        "github" => Scheme::Github,
        "stripe" => Scheme::Stripe,
        other => match other.bytes().next().unwrap_or(0) % 3 {
            0 => Scheme::StandardWebhooks,
            1 => Scheme::Github,
            _ => Scheme::Stripe,
        },
    };
    let (secret, key) = match scheme {
        Scheme::StandardWebhooks => (
            STANDARD_SECRET,
            STANDARD
                .decode(STANDARD_SECRET.trim_start_matches("whsec_"))
                .expect("spec secret is base64"),
        ),
        Scheme::Github => (GITHUB_SECRET, GITHUB_SECRET.as_bytes().to_vec()),
        _ => (STRIPE_SECRET, STRIPE_SECRET.as_bytes().to_vec()),
    };
    let verifier = Verifier::new(scheme, secret)
        .expect("fixed secret is valid")
        .expect("a signing scheme has a verifier");

    let present = |s: &str| (s != "<none>").then(|| s.to_owned());
    let id = present(&id_line);
    let ts_text = present(&ts_line);
    let ts_value = ts_text.as_deref().and_then(|t| t.parse::<i64>().ok());
    let now = match now_line.strip_prefix('~') {
        Some(off) => ts_value
            .unwrap_or(0)
            .saturating_add(off.parse::<i64>().unwrap_or(0)),
        None => now_line.parse::<i64>().unwrap_or(0),
    };

    // What each scheme signs, and the MAC of it under the key.
    let ts_for_sig = ts_text.clone().unwrap_or_default();
    let signed = |body: &[u8]| -> Vec<u8> {
        match scheme {
            Scheme::StandardWebhooks => [
                id.as_deref().unwrap_or_default().as_bytes(),
                b".",
                ts_for_sig.as_bytes(),
                b".",
                body,
            ]
            .concat(),
            Scheme::Github => body.to_vec(),
            _ => [ts_for_sig.as_bytes(), b".", body].concat(),
        }
    };
    let encode = |mac: &[u8]| match scheme {
        Scheme::StandardWebhooks => STANDARD.encode(mac),
        _ => hex(mac),
    };
    let good = encode(&hmac(&key, &signed(&body)));
    let other_body = [body.as_slice(), b"x"].concat();
    let bad = encode(&hmac(&key, &signed(&other_body)));
    let sig_header = sig_line
        .replace("{SIG}", &good)
        .replace("{BAD}", &bad)
        .replace("{TS}", &ts_for_sig);

    let headers = SignedHeaders {
        webhook_id: id.clone(),
        webhook_timestamp: ts_text.clone(),
        webhook_signature: Some(sig_header.clone()),
        hub_signature_256: Some(sig_header.clone()),
        stripe_signature: Some(sig_header.clone()),
    };
    let result = verifier.verify(&headers, &body, now);

    let fresh = |ts: i64| now.abs_diff(ts) <= TOLERANCE_SECS;
    if result.is_ok() {
        // Recompute from the header what a correct sender must have sent.
        let ok = match scheme {
            Scheme::StandardWebhooks => {
                id.is_some()
                    && ts_value.is_some_and(fresh)
                    && sig_header
                        .split(' ')
                        .filter_map(|e| e.strip_prefix("v1,"))
                        .filter_map(|s| STANDARD.decode(s).ok())
                        .any(|mac| mac == hmac(&key, &signed(&body)))
            }
            Scheme::Github => sig_header
                .strip_prefix("sha256=")
                .and_then(strict_hex)
                .is_some_and(|mac| mac == hmac(&key, &body)),
            _ => {
                let items: Vec<(&str, &str)> = sig_header
                    .split(',')
                    .filter_map(|i| i.trim().split_once('='))
                    .collect();
                let t = items.iter().rev().find(|(k, _)| *k == "t").map(|(_, v)| *v);
                t.is_some_and(|t| {
                    let content = [t.as_bytes(), b".", &body].concat();
                    t.parse::<i64>().is_ok_and(fresh)
                        && items
                            .iter()
                            .filter(|(k, _)| *k == "v1")
                            .filter_map(|(_, v)| strict_hex(v))
                            .any(|mac| mac == hmac(&key, &content))
                })
            }
        };
        assert!(
            ok,
            "{scheme:?} accepted a header that does not carry the key's MAC: \
             header={sig_header:?} id={id:?} ts={ts_text:?} now={now} body={body:?}"
        );
    }

    // Completeness: the canonical header for this request passes when fresh.
    let canonical = match scheme {
        Scheme::StandardWebhooks => sig_line == "v1,{SIG}",
        Scheme::Github => sig_line == "sha256={SIG}",
        _ => sig_line == "t={TS},v1={SIG}",
    };
    let well_formed = match scheme {
        Scheme::StandardWebhooks => id.is_some() && ts_value.is_some_and(fresh),
        Scheme::Github => true,
        _ => ts_value.is_some_and(fresh) && !ts_for_sig.contains([',', '=']),
    };
    if canonical && well_formed {
        assert_eq!(
            result,
            Ok(()),
            "{scheme:?} refused its own canonical signature"
        );
    }
    // inletd's signing helper produces the same canonical header.
    if let (Some(ts), true) = (ts_value, ts_value.map(|t| t.to_string()) == ts_text) {
        let expected = match scheme {
            Scheme::StandardWebhooks => id
                .as_deref()
                .and_then(|id| sign::standard(secret, id, ts, &body))
                .map(|s| (s, format!("v1,{good}"))),
            Scheme::Github => sign::github(secret, &body).map(|s| (s, format!("sha256={good}"))),
            _ => sign::stripe(secret, ts, &body).map(|s| (s, format!("t={ts},v1={good}"))),
        };
        if let Some((helper, ours)) = expected {
            assert_eq!(helper, ours);
        }
    }
});

fn hmac(key: &[u8], content: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(content);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex as documented: pairs of `[0-9a-fA-F]`, nothing else.
fn strict_hex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}
