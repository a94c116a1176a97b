//! Guest RAM: one anonymous private mapping, registered with KVM as slot 0 at
//! guest-physical address 0. This file holds the backend's raw-memory `unsafe`.

use std::ptr::NonNull;

use avex_core::guest::NotRam;

/// Guest RAM of a fixed size. The vCPU and this process share it; the backend
/// touches it only while the vCPU is not running (one thread drives both).
pub struct GuestRam {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (no aliases are handed out past
// a borrow of `self`), so moving it to another thread moves sole ownership.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Map `len` bytes of zeroed anonymous memory.
    pub fn new(len: usize) -> std::io::Result<GuestRam> {
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "guest RAM size is zero",
            ));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; no
        // existing memory is affected. The result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(GuestRam { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of guest-physical 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live mapping owned by `self` for its whole
        // lifetime; the vCPU does not run while this borrow exists (the same thread
        // drives KVM_RUN and needs `&mut` access to the vCPU for it).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`; `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, NotRam> {
        let start = usize::try_from(gpa).map_err(|_| NotRam { gpa })?;
        let end = start.checked_add(len).ok_or(NotRam { gpa })?;
        if end > self.len {
            // Name the first byte outside RAM.
            return Err(NotRam {
                gpa: gpa.max(self.len as u64),
            });
        }
        Ok(start..end)
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.as_slice()[r]);
        Ok(())
    }

    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let r = self.range(gpa, data.len())?;
        self.as_mut_slice()[r].copy_from_slice(data);
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made; no borrow of it can
        // outlive `self`. KVM's slot (if any) belongs to a VM fd dropped first
        // (field order in the owner).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let mut m = GuestRam::new(8192).unwrap();
        m.write(8190, &[1, 2]).unwrap();
        let mut b = [0u8; 2];
        m.read(8190, &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        assert_eq!(
            m.read(8191, &mut b),
            Err(NotRam { gpa: 8192 }),
            "names the first byte outside"
        );
        assert_eq!(m.write(u64::MAX, &[0]), Err(NotRam { gpa: u64::MAX }));
        assert!(m.read(1 << 40, &mut b).is_err());
        assert!(GuestRam::new(0).is_err());
    }
}
