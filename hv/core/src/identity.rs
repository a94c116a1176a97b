//! A guest's identity: the digest a translation set names the guest it was made
//! for by (`format::GuestIdentity`), computed one way for every caller (the AOT
//! pass, the linker, both backends) from the guest's loadable segments.
//!
//! Why a fast, non-cryptographic hash (XXH3) and not SHA-256: the identity only
//! keeps a translation set from being paired with another guest build by mistake.
//! It is no security boundary: translations are untrusted input whatever their
//! identity says (validated field by field on decoding, and every code range is
//! compared byte for byte with guest memory before each run), so a forged
//! identity gains nothing a wrong one would not. What matters is that two builds
//! differ with overwhelming probability, which 2 × 128 bits of XXH3 give, and
//! that the bare-metal hypervisor can compute it over a 60 MB Linux image under
//! Bochs' emulation in seconds: SHA-256 took minutes there.

use alloc::vec::Vec;
use xxhash_rust::xxh3::Xxh3;

use crate::elf::{ElfError, ElfFile};

/// The domain tag hashed first; bumped with the algorithm (v1 was SHA-256), so an
/// identity of one scheme never equals one of another by construction.
const DOMAIN: &[u8] = b"avex-guest-identity-v2-xxh3";

/// The two XXH3-128 seeds whose digests make the 32-byte identity.
const SEEDS: [u64; 2] = [0x6176_6578_2d69_6431, 0x6176_6578_2d69_6432];

/// Bytes fed to both hashers at a time, so each chunk is read from memory once
/// while it is still in cache.
const CHUNK: usize = 64 * 1024;

/// The identity of a guest given its loadable segments: for each segment in order
/// of physical address (ties keep the given order), its address as u64 LE, its
/// length as u64 LE, then its bytes (the file bytes, `p_filesz` of them), after
/// the domain tag `avex-guest-identity-v2-xxh3`; that stream is hashed by XXH3-128
/// under two seeds, and the identity is the first digest then the second, each
/// as u128 LE. Segments with no file bytes (pure `.bss`) are skipped, so callers
/// may list them or not. The linker, the KVM backend and the bare-metal
/// hypervisor all compute a guest's identity with this function.
pub fn of_segments<'a>(segments: impl IntoIterator<Item = (u64, &'a [u8])>) -> [u8; 32] {
    let mut segs: Vec<(u64, &[u8])> = segments
        .into_iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .collect();
    segs.sort_by_key(|(paddr, _)| *paddr);
    let mut hashers = SEEDS.map(Xxh3::with_seed);
    let mut feed = |bytes: &[u8]| {
        for h in &mut hashers {
            h.update(bytes);
        }
    };
    feed(DOMAIN);
    for (paddr, bytes) in segs {
        feed(&paddr.to_le_bytes());
        feed(&(bytes.len() as u64).to_le_bytes());
        for chunk in bytes.chunks(CHUNK) {
            feed(chunk);
        }
    }
    let mut out = [0u8; 32];
    for (half, h) in out.chunks_exact_mut(16).zip(&hashers) {
        half.copy_from_slice(&h.digest128().to_le_bytes());
    }
    out
}

/// The identity of a guest ELF image: [`of_segments`] over what
/// [`ElfFile::loadable`] lists (`PT_LOAD` segments with a non-zero memory size,
/// each as (`p_paddr`, its `p_filesz` file bytes); the allocated sections of an
/// `ET_REL`). The AOT pass, the linker and both backends compute it here.
pub fn of_elf(elf: &[u8]) -> Result<[u8; 32], ElfError> {
    of_file(&ElfFile::parse(elf)?)
}

/// [`of_elf`] of a file already read.
pub fn of_file(elf: &ElfFile<'_>) -> Result<[u8; 32], ElfError> {
    Ok(of_segments(elf.loadable()?))
}
