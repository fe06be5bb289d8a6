//! Webhook signature verification over the raw body, per source:
//! Standard Webhooks, GitHub and Stripe. Comparisons are constant-time;
//! an empty or truncated signature is a failure, never a pass.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How far a signed timestamp may be from now, either way.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// The signature schemes a source can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// No signature required.
    #[default]
    None,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64> …`.
    StandardWebhooks,
    /// `X-Hub-Signature-256: sha256=<hex>`.
    Github,
    /// `Stripe-Signature: t=<unix>,v1=<hex>[,v1=…]`.
    Stripe,
}

/// The request headers a scheme may need (already decoded as text).
#[derive(Debug, Clone, Default)]
pub struct SignedHeaders {
    /// `webhook-id`.
    pub webhook_id: Option<String>,
    /// `webhook-timestamp`.
    pub webhook_timestamp: Option<String>,
    /// `webhook-signature`.
    pub webhook_signature: Option<String>,
    /// `X-Hub-Signature-256`.
    pub hub_signature_256: Option<String>,
    /// `Stripe-Signature`.
    pub stripe_signature: Option<String>,
}

/// Why a signature was refused (answered 401 with this as the detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the {0} header is missing")]
    Missing(&'static str),
    #[error("the {0} header is malformed: {1}")]
    Malformed(&'static str, &'static str),
    #[error("the signed timestamp is more than 5 minutes from now")]
    Stale,
    #[error("no signature matches the body")]
    Mismatch,
}

/// A source's verifier: its scheme and key.
#[derive(Clone)]
pub struct Verifier {
    /// Which headers and format.
    scheme: Scheme,
    /// The HMAC key (for Standard Webhooks: the base64-decoded secret).
    key: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// A secret that cannot be used for its scheme.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(pub String);

impl Verifier {
    /// A verifier for `scheme` with `secret` as configured; `None` for
    /// [`Scheme::None`].
    pub fn new(scheme: Scheme, secret: &str) -> Result<Option<Self>, SecretError> {
        let key = match scheme {
            Scheme::None => return Ok(None),
            Scheme::StandardWebhooks => {
                let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
                STANDARD.decode(b64).map_err(|_| {
                    SecretError("a standard-webhooks secret is whsec_ followed by base64".into())
                })?
            }
            Scheme::Github | Scheme::Stripe => secret.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err(SecretError("the secret is empty".into()));
        }
        Ok(Some(Verifier { scheme, key }))
    }

    /// The scheme this verifier checks.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Checks the request; `now` is Unix seconds.
    pub fn verify(
        &self,
        headers: &SignedHeaders,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        match self.scheme {
            Scheme::None => Ok(()),
            Scheme::StandardWebhooks => self.standard(headers, body, now),
            Scheme::Github => self.github(headers, body),
            Scheme::Stripe => self.stripe(headers, body, now),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC accepts any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
    }

    fn standard(&self, h: &SignedHeaders, body: &[u8], now: i64) -> Result<(), SignatureError> {
        let id = h
            .webhook_id
            .as_deref()
            .ok_or(SignatureError::Missing("webhook-id"))?;
        let ts_text = h
            .webhook_timestamp
            .as_deref()
            .ok_or(SignatureError::Missing("webhook-timestamp"))?;
        let signatures = h
            .webhook_signature
            .as_deref()
            .ok_or(SignatureError::Missing("webhook-signature"))?;
        let ts = parse_timestamp("webhook-timestamp", ts_text)?;
        check_fresh(ts, now)?;
        let expected = self.mac(&[id.as_bytes(), b".", ts_text.as_bytes(), b".", body]);
        let mut any_v1 = false;
        for entry in signatures.split(' ').filter(|s| !s.is_empty()) {
            let Some((version, sig)) = entry.split_once(',') else {
                continue;
            };
            if version != "v1" {
                continue;
            }
            any_v1 = true;
            if let Ok(sig) = STANDARD.decode(sig)
                && constant_time_eq(&sig, &expected)
            {
                return Ok(());
            }
        }
        if any_v1 {
            Err(SignatureError::Mismatch)
        } else {
            Err(SignatureError::Malformed(
                "webhook-signature",
                "expected v1,<base64>",
            ))
        }
    }

    fn github(&self, h: &SignedHeaders, body: &[u8]) -> Result<(), SignatureError> {
        let header = h
            .hub_signature_256
            .as_deref()
            .ok_or(SignatureError::Missing("X-Hub-Signature-256"))?;
        let hex = header
            .strip_prefix("sha256=")
            .ok_or(SignatureError::Malformed(
                "X-Hub-Signature-256",
                "expected sha256=<hex>",
            ))?;
        let sig = decode_hex(hex).ok_or(SignatureError::Malformed(
            "X-Hub-Signature-256",
            "expected sha256=<hex>",
        ))?;
        if constant_time_eq(&sig, &self.mac(&[body])) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }

    fn stripe(&self, h: &SignedHeaders, body: &[u8], now: i64) -> Result<(), SignatureError> {
        const NAME: &str = "Stripe-Signature";
        let header = h
            .stripe_signature
            .as_deref()
            .ok_or(SignatureError::Missing(NAME))?;
        let mut ts_text = None;
        let mut signatures = Vec::new();
        for item in header.split(',') {
            match item.trim().split_once('=') {
                Some(("t", t)) => ts_text = Some(t),
                Some(("v1", s)) => signatures.push(s),
                _ => {}
            }
        }
        let ts_text = ts_text.ok_or(SignatureError::Malformed(
            NAME,
            "expected t=<unix>,v1=<hex>",
        ))?;
        if signatures.is_empty() {
            return Err(SignatureError::Malformed(
                NAME,
                "expected t=<unix>,v1=<hex>",
            ));
        }
        let ts = parse_timestamp(NAME, ts_text)?;
        check_fresh(ts, now)?;
        let expected = self.mac(&[ts_text.as_bytes(), b".", body]);
        if signatures
            .iter()
            .filter_map(|s| decode_hex(s))
            .any(|sig| constant_time_eq(&sig, &expected))
        {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

fn parse_timestamp(header: &'static str, text: &str) -> Result<i64, SignatureError> {
    text.parse::<i64>()
        .map_err(|_| SignatureError::Malformed(header, "the timestamp is not Unix seconds"))
}

fn check_fresh(ts: i64, now: i64) -> Result<(), SignatureError> {
    if now.abs_diff(ts) > TOLERANCE.as_secs() {
        Err(SignatureError::Stale)
    } else {
        Ok(())
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Signing helpers for tests and the CLI's demo: the header values a sender
/// of each scheme would send.
pub mod sign {
    use super::*;

    /// `webhook-signature` value for the Standard Webhooks scheme.
    pub fn standard(secret: &str, id: &str, ts: i64, body: &[u8]) -> Option<String> {
        let v = Verifier::new(Scheme::StandardWebhooks, secret).ok()??;
        Some(format!(
            "v1,{}",
            STANDARD.encode(v.mac(&[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body]))
        ))
    }

    /// `X-Hub-Signature-256` value.
    pub fn github(secret: &str, body: &[u8]) -> Option<String> {
        let v = Verifier::new(Scheme::Github, secret).ok()??;
        Some(format!("sha256={}", hex(&v.mac(&[body]))))
    }

    /// `Stripe-Signature` value.
    pub fn stripe(secret: &str, ts: i64, body: &[u8]) -> Option<String> {
        let v = Verifier::new(Scheme::Stripe, secret).ok()??;
        Some(format!(
            "t={ts},v1={}",
            hex(&v.mac(&[ts.to_string().as_bytes(), b".", body]))
        ))
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn standard_headers(sig: &str) -> SignedHeaders {
        SignedHeaders {
            webhook_id: Some(ID.into()),
            webhook_timestamp: Some(TS.to_string()),
            webhook_signature: Some(sig.into()),
            ..SignedHeaders::default()
        }
    }

    #[test]
    fn the_standard_webhooks_published_vector_verifies() {
        let v = Verifier::new(Scheme::StandardWebhooks, SECRET)
            .unwrap()
            .unwrap();
        assert_eq!(sign::standard(SECRET, ID, TS, BODY).as_deref(), Some(SIG));
        assert_eq!(v.verify(&standard_headers(SIG), BODY, TS), Ok(()));
        // Key rotation: any of several space-separated signatures may match.
        let rotated = format!("v1,bm90IHRoaXMgb25l {SIG}");
        assert_eq!(v.verify(&standard_headers(&rotated), BODY, TS + 10), Ok(()));
    }

    #[test]
    fn standard_webhooks_refuses_what_it_must() {
        let v = Verifier::new(Scheme::StandardWebhooks, SECRET)
            .unwrap()
            .unwrap();
        let other_body = br#"{"test": 2432232315}"#;
        assert_eq!(
            v.verify(&standard_headers(SIG), other_body, TS),
            Err(SignatureError::Mismatch)
        );
        // The svix #1190 bypass: an empty or truncated signature must fail.
        for bad in ["v1,", "v1", "", " ", "v2,abc"] {
            assert!(
                v.verify(&standard_headers(bad), BODY, TS).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            v.verify(&standard_headers(SIG), BODY, TS + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            v.verify(&standard_headers(SIG), BODY, TS - 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(v.verify(&standard_headers(SIG), BODY, TS + 300), Ok(()));
        let mut no_id = standard_headers(SIG);
        no_id.webhook_id = None;
        assert_eq!(
            v.verify(&no_id, BODY, TS),
            Err(SignatureError::Missing("webhook-id"))
        );
        assert!(Verifier::new(Scheme::StandardWebhooks, "whsec_not base64!").is_err());
    }

    #[test]
    fn github_and_stripe_presets() {
        let gh = Verifier::new(Scheme::Github, "It's a Secret to Everybody")
            .unwrap()
            .unwrap();
        // GitHub's documented example.
        let headers = SignedHeaders {
            hub_signature_256: Some(
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".into(),
            ),
            ..SignedHeaders::default()
        };
        assert_eq!(gh.verify(&headers, b"Hello, World!", 0), Ok(()));
        assert_eq!(
            gh.verify(&headers, b"Hello, World?", 0),
            Err(SignatureError::Mismatch)
        );
        let empty = SignedHeaders {
            hub_signature_256: Some("sha256=".into()),
            ..SignedHeaders::default()
        };
        assert!(gh.verify(&empty, b"Hello, World!", 0).is_err());

        let st = Verifier::new(Scheme::Stripe, "whsec_test")
            .unwrap()
            .unwrap();
        let value = sign::stripe("whsec_test", 1_700_000_000, b"{}").unwrap();
        let headers = SignedHeaders {
            stripe_signature: Some(value.clone()),
            ..SignedHeaders::default()
        };
        assert_eq!(st.verify(&headers, b"{}", 1_700_000_100), Ok(()));
        assert_eq!(
            st.verify(&headers, b"{}", 1_700_000_400),
            Err(SignatureError::Stale)
        );
        let truncated = SignedHeaders {
            stripe_signature: Some("t=1700000000,v1=".into()),
            ..SignedHeaders::default()
        };
        assert!(st.verify(&truncated, b"{}", 1_700_000_000).is_err());
    }
}
