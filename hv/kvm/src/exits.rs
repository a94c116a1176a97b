//! Exits to user space that reach the exit handler: port I/O (string I/O
//! handled element by element, singly) and MSR accesses, each completed and
//! attributed exactly (the `attribute` module) before a cluster runs after it;
//! and the guest TLB flush a cluster may leave to do.

use std::time::Instant;

use avex_core::exit::{Exit, Mode, Next};
use avex_core::guest::Guest;
use avex_core::stats::ExitReason;
use kvm_bindings::{KVM_EXIT_IO, KVM_EXIT_IO_OUT};
use kvm_ioctls::VcpuFd;

use crate::attribute::Attribution;
use crate::{insn, Error, Vm};

impl Vm {
    /// The I/O exit now in `kvm_run`.
    pub(crate) fn on_io(&mut self) -> Result<(), Error> {
        let io = io_info(&mut self.guest.vcpu);
        let write = u32::from(io.direction) == KVM_EXIT_IO_OUT;
        let size = io.size;
        let len = io.count as usize * size as usize;
        let off = io.data_offset as usize;
        if off.checked_add(len).is_none_or(|end| end > self.run_size) || len == 0 {
            let rip = self.guest.rip();
            return Err(Error::Unexpected {
                rip,
                what: format!("I/O data at offset {off:#x}, {len} bytes, outside kvm_run"),
            });
        }
        if io.count != 1 || !matches!(size, 1 | 2 | 4) {
            // String I/O (INS/OUTS): every element goes to the bus; handled singly.
            self.handler.count_exit(string_reason(write));
            let data = io_data(&mut self.guest.vcpu, off, len);
            let mut buf = data.to_vec();
            for chunk in buf.chunks_mut(size as usize) {
                if write {
                    let mut v = [0u8; 4];
                    v[..chunk.len()].copy_from_slice(chunk);
                    self.guest.port_out(io.port, size, u32::from_le_bytes(v));
                } else {
                    let v = self.guest.port_in(io.port, size).to_le_bytes();
                    chunk.copy_from_slice(&v[..chunk.len()]);
                }
            }
            if !write {
                io_data(&mut self.guest.vcpu, off, len).copy_from_slice(&buf);
            }
            return Ok(());
        }
        let value = if write {
            let data = io_data(&mut self.guest.vcpu, off, len);
            let mut v = [0u8; 4];
            v[..len].copy_from_slice(data);
            u32::from_le_bytes(v)
        } else {
            0
        };
        let before = (self.handler.mode() != Mode::Off).then(|| self.guest.state());
        let exit = Exit::PortIo {
            port: io.port,
            size,
            write,
            value,
        };
        let result = self.handler.perform(&exit, &mut self.guest);
        if !write {
            let v = (result.unwrap_or(u64::MAX) as u32).to_le_bytes();
            io_data(&mut self.guest.vcpu, off, len).copy_from_slice(&v[..len]);
        }
        let Some(before) = before else {
            self.handler.count_exit(exit.reason());
            return Ok(());
        };
        let access = insn::Access::Io {
            write,
            size,
            port: io.port,
        };
        match self.complete_and_attribute(access, &before)? {
            Attribution::Exact { start, insn } if !insn.kind.is_string() => {
                self.handler.count_exit(exit.reason());
                self.cluster_after(start);
            }
            Attribution::Exact { .. } | Attribution::String => {
                self.handler.count_exit(string_reason(write));
            }
            Attribution::Unattributed(_) => {
                self.handler.count_exit(exit.reason());
                self.unattributed_exits += 1;
            }
        }
        Ok(())
    }

    pub(crate) fn on_msr(&mut self, index: u32, write: bool, data: u64) -> Result<(), Error> {
        let before = (self.handler.mode() != Mode::Off).then(|| self.guest.state());
        let exit = Exit::Msr {
            msr: index,
            write,
            value: data,
        };
        self.handler.count_exit(exit.reason());
        let result = self.handler.perform(&exit, &mut self.guest);
        let run = self.guest.vcpu.get_kvm_run();
        // Writing a union field of plain integers: no invalid value can result.
        match result {
            Ok(v) => {
                run.__bindgen_anon_1.msr.data = if write { data } else { v };
                run.__bindgen_anon_1.msr.error = 0;
            }
            // KVM injects #GP at the next KVM_RUN; no cluster follows a fault.
            Err(_) => run.__bindgen_anon_1.msr.error = 1,
        }
        let (Ok(_), Some(before)) = (result, before) else {
            return Ok(());
        };
        let access = if write {
            insn::Access::Wrmsr
        } else {
            insn::Access::Rdmsr
        };
        match self.complete_and_attribute(access, &before)? {
            Attribution::Exact { start, .. } => self.cluster_after(start),
            Attribution::String | Attribution::Unattributed(_) => self.unattributed_exits += 1,
        }
        Ok(())
    }

    /// After the exiting instruction at `start` completed: run the cluster the
    /// handler names, if any.
    fn cluster_after(&mut self, start: u64) {
        if let Next::RunCluster { start } = self.handler.next_after(start, &mut self.guest) {
            let t = Instant::now();
            self.handler.run_cluster(start, &mut self.guest);
            self.time.cluster_ns += t.elapsed().as_nanos() as u64;
        }
    }

    /// Flush the guest TLB if the engine invalidated translations that KVM will
    /// not flush by itself. KVM resets its MMU and requests a guest TLB flush
    /// (KVM_REQ_TLB_FLUSH_GUEST) when KVM_SET_SREGS, or sregs synced through
    /// `kvm_run`, change CR0, CR3, CR4 or EFER: so load the sregs once with CR3's
    /// PWT bit flipped (applied by an immediate-exit KVM_RUN, no guest code runs)
    /// and then as they are, which the next KVM_RUN applies (a second flush).
    /// KVM offers user space no other way to flush a vCPU's TLB.
    pub(crate) fn flush_guest_tlb(&mut self) -> Result<(), Error> {
        if !self.guest.take_tlb_flush() {
            return Ok(());
        }
        let s = self.guest.state_sregs();
        let mut toggled = s;
        toggled.cr3 ^= avex_core::arch::cr3::PWT;
        self.guest.put_sregs(toggled);
        if self.guest.synced() {
            self.immediate_run()?;
        }
        self.guest.put_sregs(s);
        self.tlb_flushes += 1;
        Ok(())
    }
}

/// The reason string I/O exits are counted under.
/// String port I/O counts as on VT-x: `outs`/`ins`, one per instruction.
fn string_reason(write: bool) -> ExitReason {
    if write {
        ExitReason::Outs
    } else {
        ExitReason::Ins
    }
}

fn io_info(vcpu: &mut VcpuFd) -> kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_4 {
    let run = vcpu.get_kvm_run();
    debug_assert_eq!(run.exit_reason, KVM_EXIT_IO);
    // SAFETY: called only right after KVM_RUN returned KVM_EXIT_IO, so `io` is the
    // union member KVM wrote; it is plain integers.
    unsafe { run.__bindgen_anon_1.io }
}

/// The I/O data area of the vCPU's `kvm_run` mapping.
fn io_data(vcpu: &mut VcpuFd, off: usize, len: usize) -> &mut [u8] {
    let base = vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run as *mut u8;
    // SAFETY: KVM's `data_offset` points into the vCPU's kvm_run mapping, which
    // stays mapped as long as the VcpuFd borrowed here; the caller checked
    // `off + len <= KVM_GET_VCPU_MMAP_SIZE`. The vCPU is not running (we hold
    // `&mut VcpuFd`), so nothing else accesses the bytes during the borrow.
    unsafe { std::slice::from_raw_parts_mut(base.add(off), len) }
}
