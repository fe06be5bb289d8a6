//! Arbitrary bytes into the on-disk record decoder, as a `WalRecord` and as
//! a `DlqEntry`: once as they are, and once wrapped in an envelope with a
//! correct checksum, so that the bincode body decoder behind the CRC check
//! is reached too (a CRC is no defence against a writer bug or a file
//! copied from elsewhere, and invariant 5 says nothing undecodable crashes
//! the daemon).
//!
//! Properties: nothing panics or aborts; each error is the right one for
//! the header; whatever decodes re-encodes to an envelope that decodes to
//! the same value.
#![no_main]

use inletd::event::WalRecord;
use inletd::storage::{DlqEntry, FORMAT_VERSION, RecordError, decode_record, encode_record};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

fuzz_target!(|data: &[u8]| {
    check::<WalRecord>(data);
    check::<DlqEntry>(data);
    if let Some((&version, body)) = data.split_first() {
        // Mostly the current version; a high bit keeps the byte as it is.
        let version = if version & 0x80 == 0 {
            FORMAT_VERSION
        } else {
            version
        };
        let mut envelope = Vec::with_capacity(body.len() + 5);
        envelope.push(version);
        envelope.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
        envelope.extend_from_slice(body);
        check::<WalRecord>(&envelope);
        check::<DlqEntry>(&envelope);
    }
});

fn check<T>(bytes: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match decode_record::<T>(bytes) {
        Ok(value) => {
            assert!(bytes.len() >= 5 && bytes[0] <= FORMAT_VERSION);
            let crc = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            assert_eq!(
                crc,
                crc32fast::hash(&bytes[5..]),
                "decoded past a bad checksum"
            );
            let again = encode_record(&value);
            assert_eq!(again[0], FORMAT_VERSION);
            assert_eq!(decode_record::<T>(&again), Ok(value));
        }
        Err(RecordError::Truncated(n)) => assert!(n == bytes.len() && n < 5),
        Err(RecordError::NewerVersion(v)) => assert!(v == bytes[0] && v > FORMAT_VERSION),
        Err(RecordError::Checksum) => {
            let crc = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            assert_ne!(crc, crc32fast::hash(&bytes[5..]), "good checksum refused");
        }
        Err(RecordError::Body(msg)) => assert!(!msg.is_empty()),
    }
}
