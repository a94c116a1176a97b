//! The translation format: a versioned, self-describing binary encoding of a set of
//! clusters, as shipped in a pre-analyzed image (`.avex.translations`) or in a file
//! written by `avex analyze`.
//!
//! Everything decoded here is untrusted (DESIGN.md, "Translations are untrusted
//! input"): [`decode`] checks the header, the payload checksum, and then every field
//! and bound of every cluster ([`validate`]) before a cluster may reach the engine.
//! [`check_against`] then rejects a set made for another guest build or another
//! exit policy.
//!
//! # Layout, version 4 (all integers little-endian)
//!
//! Version 2 clusters are regions over the control-flow graph: several code
//! ranges, calls, returns and guarded indirect branches (see [`crate::ir`]).
//! Version 3 has version 2's layout; its guest digest is the XXH3 identity
//! (`avex-guest-identity-v2-xxh3`, see [`crate::identity`]) where version 2's
//! was SHA-256, so a version 2 set is refused as made by another version of avex
//! rather than as made for another guest. Version 4 has version 3's layout with
//! more ops in the IR (PUSHF, POPF, CLI, STI, CMPXCHG, XADD, LEAVE, BSWAP,
//! one-operand MUL/IMUL): a version 3 reader would not know them. Versions 1 to 3
//! are refused with the version they carry.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"AVEXTRN\0"` |
//! | 8 | 2 | format version (4) |
//! | 10 | 2 | header length: offset of the payload |
//! | 12 | 4 | flags (must be 0) |
//! | 16 | 32 | guest digest ([`crate::identity::of_segments`]: XXH3-128 under two seeds) |
//! | 48 | 32 | exit-policy fingerprint |
//! | 80 | 32 | translator-config fingerprint |
//! | 112 | 4 | cluster count |
//! | 116 | 8 | payload length |
//! | 124 | 32 | SHA-256 of the payload |
//! | 156 | 2 | guest name length `n` (≤ 255) |
//! | 158 | 2 | translator description length `m` (≤ 1024) |
//! | 160 | n | guest name, UTF-8 |
//! | 160+n | m | translator description, UTF-8 |
//! | header length | payload length | the clusters, each postcard-encoded, one after another |
//!
//! The file ends with the payload: trailing bytes are an error.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ir::Cluster;

/// First 8 bytes of every translation set.
pub const MAGIC: [u8; 8] = *b"AVEXTRN\0";
/// The format version this code writes and reads.
pub const VERSION: u16 = 4;
/// Size of the fixed part of the header.
pub const FIXED_HEADER_LEN: usize = 160;
/// Longest guest name accepted.
pub const MAX_NAME_LEN: usize = 255;
/// Longest translator description accepted.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most clusters accepted in one set.
pub const MAX_CLUSTERS: usize = 1 << 16;

/// Cluster validation and its limits are the IR's; decoding applies them to every
/// cluster it reads.
pub use crate::ir::limits::{MAX_CLUSTER_BYTES, MAX_INSN_LEN, MAX_LOOP_HEAD_INSNS};
pub use crate::ir::{validate, ClusterError};

/// Which guest build a translation set was made for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    /// [`crate::identity::of_segments`] over the guest's loadable segments.
    pub digest: [u8; 32],
    /// Informative only (e.g. the ELF's file name); never compared.
    pub name: String,
}

/// Which translator configuration made the clusters.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TranslatorStamp {
    /// A fingerprint of the translator's configuration ([`fingerprint_of`] over it).
    pub fingerprint: [u8; 32],
    /// Human-readable summary (e.g. `lookahead=16 gap_mem=4 backedge_cap=10`).
    pub description: String,
}

/// A set of clusters for one guest build under one exit policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslationSet {
    pub guest: GuestIdentity,
    /// Fingerprint of the exit policy the clusters assumed.
    pub policy: [u8; 32],
    pub translator: TranslatorStamp,
    /// Sorted by entry RIP ([`Cluster::entry_rip`]), entries unique.
    pub clusters: Vec<Cluster>,
}

/// SHA-256 of a value's postcard encoding: a stable fingerprint for configuration
/// values (the translator's config; the exit policy's until it has its own).
pub fn fingerprint_of<T: Serialize + ?Sized>(value: &T) -> [u8; 32] {
    let bytes = postcard::to_allocvec(value).unwrap_or_default();
    Sha256::digest(&bytes).into()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

/// Why bytes are not a translation set. Offsets are from the start of the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// The data ends inside `field`.
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    BadMagic {
        found: Vec<u8>,
    },
    UnsupportedVersion {
        found: u16,
        supported: u16,
    },
    /// A header field holds a value this version does not allow.
    BadField {
        field: &'static str,
        offset: usize,
        reason: &'static str,
    },
    ChecksumMismatch {
        expected: [u8; 32],
        actual: [u8; 32],
    },
    TooManyClusters {
        count: u64,
        max: usize,
    },
    /// Cluster `cluster` cannot be decoded at `offset`.
    PayloadMalformed {
        cluster: usize,
        offset: usize,
        reason: String,
    },
    /// Bytes left over after the last cluster or after the payload.
    TrailingBytes {
        offset: usize,
        count: usize,
    },
    /// Cluster `cluster` decoded but breaks a rule.
    ClusterInvalid {
        cluster: usize,
        /// Its entry RIP (0 if it has none).
        entry: u64,
        error: ClusterError,
    },
    /// Clusters not sorted by entry RIP, or two with the same entry.
    NotSorted {
        cluster: usize,
        entry: u64,
        previous: u64,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match self {
            Truncated { field, offset, needed, available } => write!(
                f,
                "truncated at offset {offset}: {field} needs {needed} bytes, {available} left"
            ),
            BadMagic { found } => {
                write!(f, "bad magic at offset 0: found {found:02x?}, expected \"AVEXTRN\\0\"")
            }
            UnsupportedVersion { found, supported } => write!(
                f,
                "unsupported format version {found} at offset 8: made by another version of avex (this build reads version {supported}; make the translations again with this build)"
            ),
            BadField { field, offset, reason } => {
                write!(f, "bad {field} at offset {offset}: {reason}")
            }
            ChecksumMismatch { expected, actual } => write!(
                f,
                "payload checksum mismatch: header says {}, payload hashes to {}",
                Hex(expected),
                Hex(actual)
            ),
            TooManyClusters { count, max } => {
                write!(f, "cluster count {count} at offset 112 exceeds the limit {max}")
            }
            PayloadMalformed { cluster, offset, reason } => {
                write!(f, "payload malformed: cluster {cluster} at offset {offset}: {reason}")
            }
            TrailingBytes { offset, count } => {
                write!(f, "{count} trailing bytes at offset {offset}")
            }
            ClusterInvalid { cluster, entry, error } => {
                write!(f, "cluster {cluster} (entry {entry:#x}) invalid: {error}")
            }
            NotSorted { cluster, entry, previous } => write!(
                f,
                "cluster {cluster} (entry {entry:#x}) does not follow the previous entry {previous:#x}: clusters must be sorted by entry and unique"
            ),
        }
    }
}

impl core::error::Error for FormatError {}

/// A hex rendering of a digest.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a well-formed set must not be used for this guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Made for another guest build (the guest was rebuilt, or this is another guest).
    OtherGuest {
        made_for: GuestIdentity,
        running: [u8; 32],
    },
    /// Made under another exit policy.
    OtherPolicy {
        assumed: [u8; 32],
        running: [u8; 32],
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::OtherGuest { made_for, running } => write!(
                f,
                "stale translations: made for guest {:?} with identity {}, but the running guest's identity is {}",
                made_for.name,
                Hex(&made_for.digest),
                Hex(running)
            ),
            Rejection::OtherPolicy { assumed, running } => write!(
                f,
                "translations assumed exit policy {}, but the hypervisor runs policy {}",
                Hex(assumed),
                Hex(running)
            ),
        }
    }
}

impl core::error::Error for Rejection {}

// ---------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------

/// Encode a set. Encoding does not validate: [`decode`] of the result fails if the
/// set breaks a rule, so writers should [`validate_set`] first.
/// Names and descriptions longer than the limits are cut at a character boundary.
pub fn encode(set: &TranslationSet) -> Vec<u8> {
    let mut payload = Vec::new();
    for c in &set.clusters {
        // Serializing an in-memory IR value into a Vec cannot fail: every field has
        // a known length and postcard supports every serde type the IR uses.
        let bytes = postcard::to_allocvec(c).expect("postcard encodes every IR value");
        payload.extend_from_slice(&bytes);
    }
    let name = cut(&set.guest.name, MAX_NAME_LEN);
    let desc = cut(&set.translator.description, MAX_DESCRIPTION_LEN);
    let header_len = FIXED_HEADER_LEN + name.len() + desc.len();

    let mut out = Vec::with_capacity(header_len + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&set.guest.digest);
    out.extend_from_slice(&set.policy);
    out.extend_from_slice(&set.translator.fingerprint);
    out.extend_from_slice(&(set.clusters.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(&payload));
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u16).to_le_bytes());
    debug_assert_eq!(out.len(), FIXED_HEADER_LEN);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(desc.as_bytes());
    out.extend_from_slice(&payload);
    out
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut n = max;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

// ---------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FormatError> {
        let available = self.bytes.len() - self.pos;
        if n > available {
            return Err(FormatError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// `n` bytes of UTF-8 text.
    fn text(&mut self, n: usize, field: &'static str) -> Result<&'a str, FormatError> {
        let offset = self.pos;
        core::str::from_utf8(self.take(n, field)?).map_err(|_| FormatError::BadField {
            field,
            offset,
            reason: "not UTF-8",
        })
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
}

/// A translation set every cluster of which passed [`validate_set`]: made only by
/// [`check`] and [`decode_checked`], so what holds one (the translation cache)
/// need not validate again.
#[derive(Clone, Debug)]
pub struct CheckedSet(TranslationSet);

impl CheckedSet {
    pub fn set(&self) -> &TranslationSet {
        &self.0
    }
    pub fn into_set(self) -> TranslationSet {
        self.0
    }
}

/// Validate a set made in memory (by the AOT pass, for a backend that runs it
/// without writing it out).
pub fn check(set: TranslationSet) -> Result<CheckedSet, FormatError> {
    validate_set(&set)?;
    Ok(CheckedSet(set))
}

/// [`decode`], keeping the proof that it validated.
pub fn decode_checked(bytes: &[u8]) -> Result<CheckedSet, FormatError> {
    decode(bytes).map(CheckedSet)
}

/// Decode and validate a translation set. Never panics: any defect is an error
/// naming the field or cluster, the offset and the reason.
pub fn decode(bytes: &[u8]) -> Result<TranslationSet, FormatError> {
    // Magic first, even on short input, so a wrong file says "bad magic".
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(FormatError::BadMagic {
            found: bytes[..magic_len].to_vec(),
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    r.take(MAGIC.len(), "magic")?;
    let version = r.u16("format version")?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let header_len_off = r.pos;
    let header_len = r.u16("header length")? as usize;
    let flags_off = r.pos;
    let flags = r.u32("flags")?;
    let digest = r.array::<32>("guest digest")?;
    let policy = r.array::<32>("policy fingerprint")?;
    let translator_fp = r.array::<32>("translator fingerprint")?;
    let count = r.u32("cluster count")? as u64;
    let payload_len = r.u64("payload length")?;
    let checksum = r.array::<32>("payload checksum")?;
    let name_len_off = r.pos;
    let name_len = r.u16("guest name length")? as usize;
    let desc_len_off = r.pos;
    let desc_len = r.u16("translator description length")? as usize;

    if flags != 0 {
        return Err(FormatError::BadField {
            field: "flags",
            offset: flags_off,
            reason: "no flags are defined; must be 0",
        });
    }
    if name_len > MAX_NAME_LEN {
        return Err(FormatError::BadField {
            field: "guest name length",
            offset: name_len_off,
            reason: "longer than 255 bytes",
        });
    }
    if desc_len > MAX_DESCRIPTION_LEN {
        return Err(FormatError::BadField {
            field: "translator description length",
            offset: desc_len_off,
            reason: "longer than 1024 bytes",
        });
    }
    if header_len != FIXED_HEADER_LEN + name_len + desc_len {
        return Err(FormatError::BadField {
            field: "header length",
            offset: header_len_off,
            reason: "does not equal 160 + guest name length + translator description length",
        });
    }
    let name = r.text(name_len, "guest name")?;
    let desc = r.text(desc_len, "translator description")?;
    if count > MAX_CLUSTERS as u64 {
        return Err(FormatError::TooManyClusters {
            count,
            max: MAX_CLUSTERS,
        });
    }
    let payload_off = r.pos;
    let available = bytes.len() - payload_off;
    if payload_len > available as u64 {
        return Err(FormatError::Truncated {
            field: "payload",
            offset: payload_off,
            needed: usize::try_from(payload_len).unwrap_or(usize::MAX),
            available,
        });
    }
    let payload = r.take(payload_len as usize, "payload")?;
    if r.pos != bytes.len() {
        return Err(FormatError::TrailingBytes {
            offset: r.pos,
            count: bytes.len() - r.pos,
        });
    }
    let actual = sha256(payload);
    if actual != checksum {
        return Err(FormatError::ChecksumMismatch {
            expected: checksum,
            actual,
        });
    }

    let mut clusters = Vec::new();
    let mut rest = payload;
    for k in 0..count as usize {
        let offset = payload_off + (payload.len() - rest.len());
        match postcard::take_from_bytes::<Cluster>(rest) {
            Ok((c, tail)) => {
                clusters.push(c);
                rest = tail;
            }
            Err(e) => {
                return Err(FormatError::PayloadMalformed {
                    cluster: k,
                    offset,
                    reason: alloc::format!("{e}"),
                })
            }
        }
    }
    if !rest.is_empty() {
        return Err(FormatError::TrailingBytes {
            offset: payload_off + (payload.len() - rest.len()),
            count: rest.len(),
        });
    }

    let set = TranslationSet {
        guest: GuestIdentity {
            digest,
            name: String::from(name),
        },
        policy,
        translator: TranslatorStamp {
            fingerprint: translator_fp,
            description: String::from(desc),
        },
        clusters,
    };
    validate_set(&set)?;
    Ok(set)
}

/// Check every cluster of a set ([`validate`]) and their order.
pub fn validate_set(set: &TranslationSet) -> Result<(), FormatError> {
    if set.clusters.len() > MAX_CLUSTERS {
        return Err(FormatError::TooManyClusters {
            count: set.clusters.len() as u64,
            max: MAX_CLUSTERS,
        });
    }
    let mut previous: Option<u64> = None;
    for (k, c) in set.clusters.iter().enumerate() {
        validate(c).map_err(|error| FormatError::ClusterInvalid {
            cluster: k,
            entry: c.entry_rip().unwrap_or(0),
            error,
        })?;
        // A valid cluster has an entry.
        let entry = c.entry_rip().unwrap_or(0);
        if let Some(p) = previous {
            if entry <= p {
                return Err(FormatError::NotSorted {
                    cluster: k,
                    entry,
                    previous: p,
                });
            }
        }
        previous = Some(entry);
    }
    Ok(())
}

/// Reject a well-formed set made for another guest build or another exit policy.
/// `guest_digest` is the running guest's [`crate::identity::of_segments`].
pub fn check_against(
    set: &TranslationSet,
    guest_digest: &[u8; 32],
    policy_fingerprint: &[u8; 32],
) -> Result<(), Rejection> {
    if &set.guest.digest != guest_digest {
        return Err(Rejection::OtherGuest {
            made_for: set.guest.clone(),
            running: *guest_digest,
        });
    }
    if &set.policy != policy_fingerprint {
        return Err(Rejection::OtherPolicy {
            assumed: set.policy,
            running: *policy_fingerprint,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BackEdge, Bitness, Insn, Op, PortSrc, Size, Target};
    use crate::policy::ExitClass;
    use alloc::vec;

    fn out_dx(rip: u64) -> Insn {
        Insn {
            rip,
            len: 1,
            op: Op::Out {
                size: Size::S1,
                port: PortSrc::Dx,
            },
            exit_class: Some(ExitClass::Out),
        }
    }

    fn sample() -> Cluster {
        Cluster::contiguous(
            Bitness::B64,
            0x1000,
            vec![0xee, 0xeb, 0xfd, 0xee],
            vec![
                out_dx(0x1000),
                Insn {
                    rip: 0x1001,
                    len: 2,
                    op: Op::Jmp {
                        target: Target::Insn(0),
                    },
                    exit_class: None,
                },
                out_dx(0x1003),
            ],
            vec![BackEdge {
                insn: 1,
                cap: Some(10),
            }],
        )
    }

    #[test]
    fn sample_is_valid_and_round_trips() {
        validate(&sample()).unwrap();
        let set = TranslationSet {
            guest: GuestIdentity {
                digest: [7; 32],
                name: "g".into(),
            },
            policy: [1; 32],
            translator: TranslatorStamp::default(),
            clusters: vec![sample()],
        };
        assert_eq!(decode(&encode(&set)).unwrap(), set);
    }

    #[test]
    fn backward_branch_needs_a_record() {
        let mut c = sample();
        c.back_edges.clear();
        assert_eq!(
            validate(&c),
            Err(ClusterError::UnrecordedBackEdge { insn: 1 })
        );
    }

    #[test]
    fn exit_class_must_match() {
        let mut c = sample();
        c.insns[2].exit_class = Some(ExitClass::In);
        assert_eq!(
            validate(&c),
            Err(ClusterError::ExitClassMismatch { insn: 2 })
        );
    }
}
