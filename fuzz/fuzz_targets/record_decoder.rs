//! Arbitrary bytes into the on-disk record decoders, as a `WalRecord` and a
//! `DlqEntry` (once as they are, and once wrapped in an envelope with a
//! correct checksum), and, behind a correct checksum, as a WAL segment and
//! an expiry key list, so that the decoders behind the CRC check are
//! reached too (a CRC is no defence against a writer bug or a file
//! copied from elsewhere, and invariant 5 says nothing undecodable crashes
//! the daemon).
//!
//! Properties: nothing panics or aborts; each error is the right one for
//! the header; whatever decodes re-encodes to an envelope that decodes to
//! the same value.
#![no_main]

use inletd::event::WalRecord;
use inletd::storage::{
    DlqEntry, FORMAT_VERSION, RecordError, decode_key_list, decode_record, decode_segment,
    encode_record,
};
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
        // The same bytes as a WAL segment under the key its header claims
        // (so the record table is reached) and as an expiry key list.
        let key = body
            .get(..12)
            .map(|h| {
                let first = u64::from_be_bytes(h[..8].try_into().unwrap());
                let n = u32::from_be_bytes(h[8..12].try_into().unwrap());
                first.wrapping_add(u64::from(n)).wrapping_sub(1)
            })
            .unwrap_or(0);
        if let Ok(segment) = decode_segment(key, &envelope) {
            assert_eq!(segment.last(), key);
            for seq in segment.first()..=segment.last().min(segment.first() + 64) {
                if let Ok(record) = segment.record(seq) {
                    assert_eq!(decode_record::<WalRecord>(&encode_record(&record)), Ok(record));
                }
            }
        }
        let _ = decode_key_list(&envelope);
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
