//! `format::decode` on arbitrary bytes: it must never panic, and whatever it
//! accepts must be a valid set that encodes and decodes back to itself.
//!
//! Each input is tried twice: as it is, and with the payload checksum recomputed,
//! so that the fuzzer gets past the checksum into the header, payload and cluster
//! checks behind it.
#![no_main]

use avex_core::format::{decode, encode, validate_set, FIXED_HEADER_LEN};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const CHECKSUM_OFFSET: usize = 124;

fn check(data: &[u8]) {
    match decode(data) {
        Ok(set) => {
            assert_eq!(validate_set(&set), Ok(()));
            let again = encode(&set);
            assert_eq!(decode(&again).as_ref(), Ok(&set));
        }
        Err(e) => {
            // Every error renders a message.
            assert!(!e.to_string().is_empty());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= FIXED_HEADER_LEN {
        let header_len = u16::from_le_bytes([data[10], data[11]]) as usize;
        if header_len <= data.len() {
            let mut v = data.to_vec();
            let sum: [u8; 32] = Sha256::digest(&v[header_len..]).into();
            v[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 32].copy_from_slice(&sum);
            check(&v);
        }
    }
});
