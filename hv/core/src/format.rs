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
//! # Layout, version 1 (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"AVEXTRN\0"` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length: offset of the payload |
//! | 12 | 4 | flags (must be 0) |
//! | 16 | 32 | guest digest ([`crate::identity::of_segments`]) |
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

use crate::ir::{Bitness, Cluster, CrIndex, GprIndex, MemRef, Op, Operand, RegRef, Size, Target};
use crate::policy::ExitClass;

/// First 8 bytes of every translation set.
pub const MAGIC: [u8; 8] = *b"AVEXTRN\0";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Size of the fixed part of the version-1 header.
pub const FIXED_HEADER_LEN: usize = 160;
/// Longest guest name accepted.
pub const MAX_NAME_LEN: usize = 255;
/// Longest translator description accepted.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most clusters accepted in one set.
pub const MAX_CLUSTERS: usize = 1 << 16;
/// Most guest bytes one cluster may cover (and so at most this many instructions).
pub const MAX_CLUSTER_BYTES: usize = 4096;
/// Most plain gap fillers a cluster may hold before its first exiting instruction
/// (a loop head reached only by a back-edge).
pub const MAX_LOOP_HEAD_INSNS: usize = 8;
/// Longest x86 instruction.
pub const MAX_INSN_LEN: u8 = 15;

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
    /// Sorted by `start`, starts unique.
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

/// Why a cluster is not acceptable to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterError {
    /// No instructions.
    Empty,
    /// `insns[0].rip` is not `start`.
    FirstRipNotStart { rip: u64, start: u64 },
    /// The cluster does not start at an exiting instruction of its class, nor at a
    /// loop head of at most [`MAX_LOOP_HEAD_INSNS`] gap fillers (conditional branches
    /// allowed, no exiting instruction) that one of its back-edges reaches.
    FirstNotExiting,
    /// An instruction length outside 1..=15.
    BadLength { insn: usize, len: u8 },
    /// An instruction does not start where the previous one ended.
    NotContiguous {
        insn: usize,
        rip: u64,
        expected: u64,
    },
    /// Addresses wrap around (or leave the 4 GiB space of 16/32-bit code).
    AddressOverflow { insn: usize },
    /// `end` is not the RIP after the last instruction.
    EndMismatch { end: u64, expected: u64 },
    /// `guest_bytes` does not cover exactly `start..end`.
    GuestBytesLength { len: usize, expected: u64 },
    /// The cluster covers more than [`MAX_CLUSTER_BYTES`].
    TooLarge { bytes: u64 },
    /// An operand, size or index that the op does not allow.
    Operand { insn: usize, reason: &'static str },
    /// A branch target `Target::Insn(i)` with `i` outside the cluster.
    TargetOutOfRange {
        insn: usize,
        target: u16,
        count: usize,
    },
    /// A branch to an earlier (or the same) instruction with no `BackEdge` record.
    UnrecordedBackEdge { insn: usize },
    /// A `BackEdge` record that is out of range, duplicated, out of order, or not on
    /// a backward branch.
    BadBackEdge { index: usize, reason: &'static str },
    /// `exit_class` does not match the op.
    ExitClassMismatch { insn: usize },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ClusterError::*;
        match self {
            Empty => write!(f, "no instructions"),
            FirstRipNotStart { rip, start } => {
                write!(f, "first instruction at {rip:#x} is not the cluster start {start:#x}")
            }
            FirstNotExiting => write!(
                f,
                "does not start at an exiting instruction (or at a loop head of at most {MAX_LOOP_HEAD_INSNS} gap fillers, no exiting instruction, that a back-edge reaches)"
            ),
            BadLength { insn, len } => {
                write!(f, "instruction {insn}: length {len} is outside 1..=15")
            }
            NotContiguous { insn, rip, expected } => write!(
                f,
                "instruction {insn}: at {rip:#x}, expected {expected:#x} (instructions must be contiguous and in order)"
            ),
            AddressOverflow { insn } => {
                write!(f, "instruction {insn}: address wraps around the address space")
            }
            EndMismatch { end, expected } => {
                write!(f, "end {end:#x} is not the end of the last instruction {expected:#x}")
            }
            GuestBytesLength { len, expected } => {
                write!(f, "guest_bytes has {len} bytes, the instructions cover {expected}")
            }
            TooLarge { bytes } => {
                write!(f, "covers {bytes} bytes, more than the limit {MAX_CLUSTER_BYTES}")
            }
            Operand { insn, reason } => write!(f, "instruction {insn}: {reason}"),
            TargetOutOfRange { insn, target, count } => write!(
                f,
                "instruction {insn}: branch target index {target} is outside the cluster's {count} instructions"
            ),
            UnrecordedBackEdge { insn } => {
                write!(f, "instruction {insn}: backward branch without a back-edge record")
            }
            BadBackEdge { index, reason } => write!(f, "back-edge record {index}: {reason}"),
            ExitClassMismatch { insn } => {
                write!(f, "instruction {insn}: exit class does not match the instruction")
            }
        }
    }
}

impl core::error::Error for ClusterError {}

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
        start: u64,
        error: ClusterError,
    },
    /// Clusters not sorted by start, or two with the same start.
    NotSorted {
        cluster: usize,
        start: u64,
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
                "unsupported format version {found} at offset 8 (this build reads version {supported})"
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
            ClusterInvalid { cluster, start, error } => {
                write!(f, "cluster {cluster} (start {start:#x}) invalid: {error}")
            }
            NotSorted { cluster, start, previous } => write!(
                f,
                "cluster {cluster} (start {start:#x}) does not follow the previous start {previous:#x}: clusters must be sorted by start and unique"
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
            reason: "no flags are defined in version 1; must be 0",
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
    let name_off = r.pos;
    let name = core::str::from_utf8(r.take(name_len, "guest name")?).map_err(|_| {
        FormatError::BadField {
            field: "guest name",
            offset: name_off,
            reason: "not UTF-8",
        }
    })?;
    let desc_off = r.pos;
    let desc = core::str::from_utf8(r.take(desc_len, "translator description")?).map_err(|_| {
        FormatError::BadField {
            field: "translator description",
            offset: desc_off,
            reason: "not UTF-8",
        }
    })?;
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
            start: c.start,
            error,
        })?;
        if let Some(p) = previous {
            if c.start <= p {
                return Err(FormatError::NotSorted {
                    cluster: k,
                    start: c.start,
                    previous: p,
                });
            }
        }
        previous = Some(c.start);
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

// ---------------------------------------------------------------------------------
// Cluster validation
// ---------------------------------------------------------------------------------

/// The exit class an op has when it exits, or `None` for ops that never exit
/// (gap fillers, and MOV to/from CR2, which VT-x never intercepts).
pub fn exit_class_of(op: &Op) -> Option<ExitClass> {
    use ExitClass as E;
    Some(match op {
        Op::In { .. } => E::In,
        Op::Out { .. } => E::Out,
        Op::Ins { .. } => E::Ins,
        Op::Outs { .. } => E::Outs,
        Op::Rdmsr => E::Rdmsr,
        Op::Wrmsr => E::Wrmsr,
        Op::Cpuid => E::Cpuid,
        Op::MovToCr { cr, .. } => match cr {
            0 => E::MovToCr0,
            3 => E::MovToCr3,
            4 => E::MovToCr4,
            8 => E::MovToCr8,
            _ => return None,
        },
        Op::MovFromCr { cr, .. } => match cr {
            0 => E::MovFromCr0,
            3 => E::MovFromCr3,
            4 => E::MovFromCr4,
            8 => E::MovFromCr8,
            _ => return None,
        },
        Op::Clts => E::Clts,
        Op::Lmsw { .. } => E::Lmsw,
        Op::Rdtsc => E::Rdtsc,
        Op::Rdtscp => E::Rdtscp,
        Op::Rdpmc => E::Rdpmc,
        Op::Xgetbv => E::Xgetbv,
        Op::Xsetbv => E::Xsetbv,
        Op::Wbinvd => E::Wbinvd,
        Op::Invd => E::Invd,
        Op::Invlpg { .. } => E::Invlpg,
        Op::Pause => E::Pause,
        Op::Hlt => E::Hlt,
        _ => return None,
    })
}

/// Check every index and bound of one cluster (see the module's rules): after this
/// the engine may run it without further checks of the IR itself.
pub fn validate(c: &Cluster) -> Result<(), ClusterError> {
    use ClusterError as CE;
    let n = c.insns.len();
    if n == 0 {
        return Err(CE::Empty);
    }
    if c.insns[0].rip != c.start {
        return Err(CE::FirstRipNotStart {
            rip: c.insns[0].rip,
            start: c.start,
        });
    }
    let limit: u64 = match c.bitness {
        Bitness::B64 => u64::MAX,
        _ => 1 << 32,
    };
    let mut next = c.start;
    for (i, insn) in c.insns.iter().enumerate() {
        if insn.len == 0 || insn.len > MAX_INSN_LEN {
            return Err(CE::BadLength {
                insn: i,
                len: insn.len,
            });
        }
        if insn.rip != next {
            return Err(CE::NotContiguous {
                insn: i,
                rip: insn.rip,
                expected: next,
            });
        }
        next = match insn.rip.checked_add(insn.len as u64) {
            Some(e) if e <= limit => e,
            _ => return Err(CE::AddressOverflow { insn: i }),
        };
        if next - c.start > MAX_CLUSTER_BYTES as u64 {
            return Err(CE::TooLarge {
                bytes: next - c.start,
            });
        }
    }
    if c.end != next {
        return Err(CE::EndMismatch {
            end: c.end,
            expected: next,
        });
    }
    let covered = next - c.start;
    if c.guest_bytes.len() as u64 != covered {
        return Err(CE::GuestBytesLength {
            len: c.guest_bytes.len(),
            expected: covered,
        });
    }

    let mut prev: Option<u16> = None;
    for (k, b) in c.back_edges.iter().enumerate() {
        let bad = |reason| CE::BadBackEdge { index: k, reason };
        if b.insn as usize >= n {
            return Err(bad("instruction index outside the cluster"));
        }
        if let Some(p) = prev {
            if b.insn <= p {
                return Err(bad(
                    "records must be sorted by instruction index and unique",
                ));
            }
        }
        prev = Some(b.insn);
        match branch_target(&c.insns[b.insn as usize].op) {
            Some(Target::Insn(t)) if t <= b.insn => {}
            Some(_) => return Err(bad("the instruction is not a backward branch")),
            None => return Err(bad("the instruction is not a branch")),
        }
    }
    for (i, insn) in c.insns.iter().enumerate() {
        check_op(&insn.op, c.bitness).map_err(|reason| CE::Operand { insn: i, reason })?;
        if let Some(class) = insn.exit_class {
            if exit_class_of(&insn.op) != Some(class) {
                return Err(CE::ExitClassMismatch { insn: i });
            }
        }
        if let Some(Target::Insn(t)) = branch_target(&insn.op) {
            if t as usize >= n {
                return Err(CE::TargetOutOfRange {
                    insn: i,
                    target: t,
                    count: n,
                });
            }
            if (t as usize) <= i && !c.back_edges.iter().any(|b| b.insn as usize == i) {
                return Err(CE::UnrecordedBackEdge { insn: i });
            }
        }
    }
    // The cluster is entered at its first exiting instruction. Up to
    // MAX_LOOP_HEAD_INSNS plain gap fillers may come before it as a loop head
    // (translator rule 3), which only a back-edge of the cluster reaches.
    let entry = c.insns.iter().position(|i| i.exit_class.is_some());
    let entry = match entry {
        Some(k) if k <= MAX_LOOP_HEAD_INSNS => k,
        _ => return Err(CE::FirstNotExiting),
    };
    if exit_class_of(&c.insns[entry].op).is_none() {
        return Err(CE::FirstNotExiting);
    }
    if entry > 0 {
        // `exit_class` is what the cluster's policy makes exit (checked against the
        // op above): PAUSE, say, is a plain gap filler when PAUSE exiting is off.
        let plain = c.insns[..entry]
            .iter()
            .all(|i| i.exit_class.is_none() && !matches!(i.op, Op::Jmp { .. } | Op::Loop { .. }));
        let reached = c.back_edges.iter().any(|b| {
            matches!(branch_target(&c.insns[b.insn as usize].op),
                Some(Target::Insn(t)) if (t as usize) < entry)
        });
        if !plain || !reached {
            return Err(CE::FirstNotExiting);
        }
    }

    Ok(())
}

fn branch_target(op: &Op) -> Option<Target> {
    match op {
        Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => Some(*target),
        _ => None,
    }
}

type Check = Result<(), &'static str>;

fn gpr(index: GprIndex, bitness: Bitness) -> Check {
    if index >= 16 {
        return Err("register index is 16 or more");
    }
    if index >= 8 && bitness != Bitness::B64 {
        return Err("registers R8..R15 exist only in 64-bit code");
    }
    Ok(())
}

fn size_ok(size: Size, bitness: Bitness) -> Check {
    if size == Size::S8 && bitness != Bitness::B64 {
        return Err("64-bit operand size outside 64-bit code");
    }
    Ok(())
}

fn reg(r: &RegRef, bitness: Bitness) -> Check {
    gpr(r.index, bitness)?;
    size_ok(r.size, bitness)?;
    if r.high8 && (r.size != Size::S1 || r.index >= 4) {
        return Err("high-byte register (AH/CH/DH/BH) needs size 1 and index 0..=3");
    }
    Ok(())
}

fn addr_size(size: Size, bitness: Bitness) -> Check {
    match (size, bitness) {
        (Size::S1, _) => Err("address size 1 does not exist"),
        (Size::S2, Bitness::B64) => Err("16-bit addressing does not exist in 64-bit code"),
        (Size::S8, Bitness::B16 | Bitness::B32) => {
            Err("64-bit addressing exists only in 64-bit code")
        }
        _ => Ok(()),
    }
}

fn mem(m: &MemRef, bitness: Bitness) -> Check {
    if let Some(b) = m.base {
        gpr(b, bitness)?;
    }
    if let Some(i) = m.index {
        gpr(i, bitness)?;
    }
    if !matches!(m.scale, 1 | 2 | 4 | 8) {
        return Err("scale is not 1, 2, 4 or 8");
    }
    addr_size(m.addr_size, bitness)
}

/// An operand of width `size`: a register of exactly that width, memory, or (if
/// `imm_ok`) an immediate.
fn operand(o: &Operand, size: Size, bitness: Bitness, imm_ok: bool) -> Check {
    match o {
        Operand::Reg(r) => {
            reg(r, bitness)?;
            if r.size != size {
                return Err("register width differs from the operation size");
            }
            Ok(())
        }
        Operand::Mem(m) => mem(m, bitness),
        Operand::Imm(_) => {
            if imm_ok {
                Ok(())
            } else {
                Err("immediate where a register or memory operand is needed")
            }
        }
    }
}

fn dst_src(size: Size, dst: &Operand, src: &Operand, bitness: Bitness) -> Check {
    size_ok(size, bitness)?;
    operand(dst, size, bitness, false)?;
    operand(src, size, bitness, true)?;
    if matches!(dst, Operand::Mem(_)) && matches!(src, Operand::Mem(_)) {
        return Err("two memory operands");
    }
    Ok(())
}

fn wide(size: Size) -> Check {
    if size == Size::S1 {
        return Err("operation size 1 is not allowed here");
    }
    Ok(())
}

fn io_size(size: Size) -> Check {
    if size == Size::S8 {
        return Err("port I/O size must be 1, 2 or 4");
    }
    Ok(())
}

fn cr(index: CrIndex) -> Check {
    if !matches!(index, 0 | 2 | 3 | 4 | 8) {
        return Err("control register is not CR0, CR2, CR3, CR4 or CR8");
    }
    Ok(())
}

fn check_op(op: &Op, bitness: Bitness) -> Check {
    let b = bitness;
    match op {
        Op::Mov { size, dst, src } => dst_src(*size, dst, src, b),
        Op::Movzx { dst, src, src_size } | Op::Movsx { dst, src, src_size } => {
            reg(dst, b)?;
            if dst.high8 {
                return Err("MOVZX/MOVSX destination cannot be a high-byte register");
            }
            if src_size.bytes() >= dst.size.bytes() {
                return Err("MOVZX/MOVSX source must be narrower than the destination");
            }
            match src {
                Operand::Imm(_) => Err("MOVZX/MOVSX source cannot be an immediate"),
                _ => operand(src, *src_size, b, false),
            }
        }
        Op::Lea { dst, addr } => {
            reg(dst, b)?;
            wide(dst.size)?;
            mem(addr, b)
        }
        Op::Alu { size, dst, src, .. } => dst_src(*size, dst, src, b),
        Op::Unary { size, dst, .. } => {
            size_ok(*size, b)?;
            operand(dst, *size, b, false)
        }
        Op::Shift {
            size, dst, count, ..
        } => {
            size_ok(*size, b)?;
            operand(dst, *size, b, false)?;
            match count {
                Operand::Imm(_) => Ok(()),
                Operand::Reg(r) if r.index == 1 && r.size == Size::S1 && !r.high8 => Ok(()),
                _ => Err("shift count must be an immediate or CL"),
            }
        }
        Op::Bit { size, dst, bit, .. } => {
            wide(*size)?;
            size_ok(*size, b)?;
            operand(dst, *size, b, false)?;
            match bit {
                Operand::Mem(_) => Err("bit offset cannot be a memory operand"),
                _ => operand(bit, *size, b, true),
            }
        }
        Op::Xchg { size, a, b: other } => {
            size_ok(*size, b)?;
            operand(a, *size, b, false)?;
            operand(other, *size, b, false)?;
            if matches!(a, Operand::Mem(_)) && matches!(other, Operand::Mem(_)) {
                return Err("two memory operands");
            }
            Ok(())
        }
        Op::Push { size, src } => {
            push_size(*size, b)?;
            operand(src, *size, b, true)
        }
        Op::Pop { size, dst } => {
            push_size(*size, b)?;
            operand(dst, *size, b, false)
        }
        Op::Setcc { dst, .. } => operand(dst, Size::S1, b, false),
        Op::Cmovcc { size, dst, src, .. } => {
            wide(*size)?;
            size_ok(*size, b)?;
            reg(dst, b)?;
            if dst.size != *size {
                return Err("register width differs from the operation size");
            }
            operand(src, *size, b, false)
        }
        Op::Imul { size, dst, src, .. } => {
            wide(*size)?;
            size_ok(*size, b)?;
            reg(dst, b)?;
            if dst.size != *size {
                return Err("register width differs from the operation size");
            }
            operand(src, *size, b, false)
        }
        Op::SignExtendAcc { size } | Op::SignExtendAccToDx { size } => {
            wide(*size)?;
            size_ok(*size, b)
        }
        Op::Clc | Op::Stc | Op::Cmc | Op::Cld | Op::Std | Op::Nop => Ok(()),
        Op::Jmp { .. } | Op::Jcc { .. } => Ok(()),
        Op::Loop { addr_size: a, .. } => addr_size(*a, b),
        Op::In { size, port: _ } | Op::Out { size, port: _ } => io_size(*size),
        Op::Ins {
            size, addr_size: a, ..
        }
        | Op::Outs {
            size, addr_size: a, ..
        } => {
            io_size(*size)?;
            addr_size(*a, b)
        }
        Op::Rdmsr | Op::Wrmsr | Op::Cpuid => Ok(()),
        Op::MovToCr { cr: c, src: r } => {
            cr(*c)?;
            gpr(*r, b)
        }
        Op::MovFromCr { cr: c, dst: r } => {
            cr(*c)?;
            gpr(*r, b)
        }
        Op::Clts => Ok(()),
        Op::Lmsw { src } => operand(src, Size::S2, b, false),
        Op::Rdtsc | Op::Rdtscp | Op::Rdpmc | Op::Xgetbv | Op::Xsetbv => Ok(()),
        Op::Wbinvd | Op::Invd | Op::Pause | Op::Hlt => Ok(()),
        Op::Invlpg { addr } => mem(addr, b),
    }
}

fn push_size(size: Size, bitness: Bitness) -> Check {
    match (size, bitness) {
        (Size::S2, _) | (Size::S8, Bitness::B64) => Ok(()),
        (Size::S4, Bitness::B16 | Bitness::B32) => Ok(()),
        _ => Err("push/pop width not valid for this code size"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BackEdge, Insn, PortSrc};
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
        Cluster {
            start: 0x1000,
            end: 0x1004,
            bitness: Bitness::B64,
            guest_bytes: vec![0xee, 0xeb, 0xfd, 0xee],
            insns: vec![
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
            back_edges: vec![BackEdge {
                insn: 1,
                cap: Some(10),
            }],
        }
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
