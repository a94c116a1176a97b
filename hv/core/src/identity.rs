//! A guest's identity: the digest a translation set names the guest it was made
//! for by (`format::GuestIdentity`), computed one way for every caller (the AOT
//! pass, the linker, both backends) from the guest's loadable segments.

use alloc::vec::Vec;
use sha2::{Digest, Sha256};

use crate::elf::{ElfError, ElfFile};

/// SHA-256 over the guest's loadable segments: for each segment in order of
/// physical address (ties keep the given order), its address as u64 LE, its length
/// as u64 LE, then its bytes (the file bytes, `p_filesz` of them), after the
/// domain tag `avex-guest-identity-v1`. Segments with no file bytes (pure `.bss`)
/// are skipped, so callers may list them or not. The linker, the KVM backend and the
/// bare-metal hypervisor all compute a guest's identity with this function.
pub fn of_segments<'a>(segments: impl IntoIterator<Item = (u64, &'a [u8])>) -> [u8; 32] {
    let mut segs: Vec<(u64, &[u8])> = segments
        .into_iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .collect();
    segs.sort_by_key(|(paddr, _)| *paddr);
    let mut h = Sha256::new();
    h.update(b"avex-guest-identity-v1");
    for (paddr, bytes) in segs {
        h.update(paddr.to_le_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().into()
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
