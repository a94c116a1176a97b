//! The vCPU's binary statistics (`KVM_GET_STATS_FD`, KVM API 4.133): a file with a
//! header, descriptors (name, offset, size) and the values. avex reads `exits` and
//! the per-kind counters from it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

struct Desc {
    name: String,
    offset: u32,
    size: u16,
}

/// An open statistics file of one vCPU.
pub struct VcpuStats {
    file: File,
    data_offset: u64,
    descs: Vec<Desc>,
}

impl VcpuStats {
    /// Open the vCPU's statistics; `Err` says why they cannot be read.
    pub fn open(vcpu: &VcpuFd) -> Result<VcpuStats, String> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file
        // descriptor or -1; it reads or writes no memory of this process.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(format!(
                "KVM_GET_STATS_FD failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut h = [0u8; 24];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| format!("reading the statistics header: {e}"))?;
        let u = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let (name_size, num, desc_off, data_off) = (u(4) as usize, u(8) as usize, u(16), u(20));
        if name_size > 4096 || num > 4096 {
            return Err(format!(
                "implausible statistics header ({num} descriptors, names of {name_size} bytes)"
            ));
        }
        let dsz = 16 + name_size;
        let mut d = vec![0u8; dsz * num];
        file.read_exact_at(&mut d, u64::from(desc_off))
            .map_err(|e| format!("reading the statistics descriptors: {e}"))?;
        let descs = d
            .chunks_exact(dsz)
            .map(|x| Desc {
                size: u16::from_le_bytes([x[6], x[7]]),
                offset: u32::from_le_bytes([x[8], x[9], x[10], x[11]]),
                name: String::from_utf8_lossy(&x[16..])
                    .trim_end_matches('\0')
                    .to_string(),
            })
            .collect();
        Ok(VcpuStats {
            file,
            data_offset: u64::from(data_off),
            descs,
        })
    }

    /// Every single-valued statistic now.
    pub fn read_all(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for d in &self.descs {
            if d.size != 1 {
                continue;
            }
            let mut v = [0u8; 8];
            if self
                .file
                .read_exact_at(&mut v, self.data_offset + u64::from(d.offset))
                .is_ok()
            {
                m.insert(d.name.clone(), u64::from_le_bytes(v));
            }
        }
        m
    }

    /// One statistic by name.
    pub fn read(&self, name: &str) -> Option<u64> {
        self.read_at(self.locate(name)?)
    }

    /// Where the single-valued statistic `name` is in the file, to read it often
    /// with [`VcpuStats::read_at`] (one `pread`, no search by name).
    pub fn locate(&self, name: &str) -> Option<u64> {
        let d = self.descs.iter().find(|d| d.name == name && d.size == 1)?;
        Some(self.data_offset + u64::from(d.offset))
    }

    /// The statistic at `at` (from [`VcpuStats::locate`]).
    pub fn read_at(&self, at: u64) -> Option<u64> {
        let mut v = [0u8; 8];
        self.file.read_exact_at(&mut v, at).ok()?;
        Some(u64::from_le_bytes(v))
    }
}

/// `after - before` for every counter (statistics that went down are left out).
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, &v)| {
            let b = before.get(k).copied().unwrap_or(0);
            (v >= b).then(|| (k.clone(), v - b))
        })
        .collect()
}
