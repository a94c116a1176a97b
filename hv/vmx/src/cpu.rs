//! The hypervisor's own CPU tables: a GDT with a TSS (VM entry needs a non-zero host
//! TR), an IDT whose assembly stubs print a diagnosis of any exception the hypervisor
//! itself takes (vector, error code, RIP, CR2, registers) on the log port, and the
//! way to end the Bochs run.

use spin::Once;
use x86_64::instructions::port::Port;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

pub const CODE_SEL: u16 = 0x08;
pub const DATA_SEL: u16 = 0x10;
pub const TSS_SEL: u16 = 0x18;

/// Stack for double faults and NMIs (IST1), so a stack overflow still gets a diagnosis.
#[repr(C, align(16))]
struct Stack([u8; 32 * 1024]);
static mut IST_STACK: Stack = Stack([0; 32 * 1024]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<GlobalDescriptorTable> = Once::new();
static IDT: Once<[u128; 256]> = Once::new();

core::arch::global_asm!(
    ".section .text",
    "exc_common:",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    push rbx",
    "    push rbp",
    "    push rsi",
    "    push rdi",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call exception_handler",
    "4:",
    "    cli",
    "    hlt",
    "    jmp 4b",
    "exc_stub_0:",
    "    push 0",
    "    push 0",
    "    jmp exc_common",
    "exc_stub_1:",
    "    push 0",
    "    push 1",
    "    jmp exc_common",
    "exc_stub_2:",
    "    push 0",
    "    push 2",
    "    jmp exc_common",
    "exc_stub_3:",
    "    push 0",
    "    push 3",
    "    jmp exc_common",
    "exc_stub_4:",
    "    push 0",
    "    push 4",
    "    jmp exc_common",
    "exc_stub_5:",
    "    push 0",
    "    push 5",
    "    jmp exc_common",
    "exc_stub_6:",
    "    push 0",
    "    push 6",
    "    jmp exc_common",
    "exc_stub_7:",
    "    push 0",
    "    push 7",
    "    jmp exc_common",
    "exc_stub_8:",
    "    push 8",
    "    jmp exc_common",
    "exc_stub_9:",
    "    push 0",
    "    push 9",
    "    jmp exc_common",
    "exc_stub_10:",
    "    push 10",
    "    jmp exc_common",
    "exc_stub_11:",
    "    push 11",
    "    jmp exc_common",
    "exc_stub_12:",
    "    push 12",
    "    jmp exc_common",
    "exc_stub_13:",
    "    push 13",
    "    jmp exc_common",
    "exc_stub_14:",
    "    push 14",
    "    jmp exc_common",
    "exc_stub_15:",
    "    push 0",
    "    push 15",
    "    jmp exc_common",
    "exc_stub_16:",
    "    push 0",
    "    push 16",
    "    jmp exc_common",
    "exc_stub_17:",
    "    push 17",
    "    jmp exc_common",
    "exc_stub_18:",
    "    push 0",
    "    push 18",
    "    jmp exc_common",
    "exc_stub_19:",
    "    push 0",
    "    push 19",
    "    jmp exc_common",
    "exc_stub_20:",
    "    push 0",
    "    push 20",
    "    jmp exc_common",
    "exc_stub_21:",
    "    push 21",
    "    jmp exc_common",
    "exc_stub_22:",
    "    push 0",
    "    push 22",
    "    jmp exc_common",
    "exc_stub_23:",
    "    push 0",
    "    push 23",
    "    jmp exc_common",
    "exc_stub_24:",
    "    push 0",
    "    push 24",
    "    jmp exc_common",
    "exc_stub_25:",
    "    push 0",
    "    push 25",
    "    jmp exc_common",
    "exc_stub_26:",
    "    push 0",
    "    push 26",
    "    jmp exc_common",
    "exc_stub_27:",
    "    push 0",
    "    push 27",
    "    jmp exc_common",
    "exc_stub_28:",
    "    push 0",
    "    push 28",
    "    jmp exc_common",
    "exc_stub_29:",
    "    push 29",
    "    jmp exc_common",
    "exc_stub_30:",
    "    push 30",
    "    jmp exc_common",
    "exc_stub_31:",
    "    push 0",
    "    push 31",
    "    jmp exc_common",
    ".section .rodata",
    ".align 8",
    ".global exc_stub_table",
    "exc_stub_table:",
    "    .quad exc_stub_0",
    "    .quad exc_stub_1",
    "    .quad exc_stub_2",
    "    .quad exc_stub_3",
    "    .quad exc_stub_4",
    "    .quad exc_stub_5",
    "    .quad exc_stub_6",
    "    .quad exc_stub_7",
    "    .quad exc_stub_8",
    "    .quad exc_stub_9",
    "    .quad exc_stub_10",
    "    .quad exc_stub_11",
    "    .quad exc_stub_12",
    "    .quad exc_stub_13",
    "    .quad exc_stub_14",
    "    .quad exc_stub_15",
    "    .quad exc_stub_16",
    "    .quad exc_stub_17",
    "    .quad exc_stub_18",
    "    .quad exc_stub_19",
    "    .quad exc_stub_20",
    "    .quad exc_stub_21",
    "    .quad exc_stub_22",
    "    .quad exc_stub_23",
    "    .quad exc_stub_24",
    "    .quad exc_stub_25",
    "    .quad exc_stub_26",
    "    .quad exc_stub_27",
    "    .quad exc_stub_28",
    "    .quad exc_stub_29",
    "    .quad exc_stub_30",
    "    .quad exc_stub_31",
    ".section .text",
);

extern "C" {
    static exc_stub_table: [u64; 32];
}

/// What the exception stubs pushed, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 FP error",
    "alignment check",
    "machine check",
    "SIMD FP error",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

#[no_mangle]
extern "C" fn exception_handler(f: &ExceptionFrame) -> ! {
    let cr2 = Cr2::read_raw();
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("?");
    crate::serial::log_unlocked(format_args!(
        "\navex-vmx: HYPERVISOR EXCEPTION #{} ({name}) error={:#x} rip={:#x} cr2={:#x} cs={:#x} rflags={:#x} rsp={:#x}\n\
         rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n\
         r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}\n",
        f.vector, f.error, f.rip, cr2, f.cs, f.rflags, f.rsp, f.rax, f.rbx, f.rcx, f.rdx, f.rsi, f.rdi,
        f.rbp, f.r8, f.r9, f.r10, f.r11, f.r12, f.r13, f.r14, f.r15
    ));
    crate::serial::log_unlocked(format_args!(
        "AVEX-SUMMARY {{\"status\":255,\"error\":\"hypervisor exception {} ({name}) at {:#x}\"}}\n",
        f.vector, f.rip
    ));
    shutdown()
}

fn idt_entry(handler: u64, ist: u8) -> u128 {
    let low = (handler & 0xffff)
        | (u64::from(CODE_SEL) << 16)
        | (u64::from(ist) << 32)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    let high = handler >> 32;
    u128::from(low) | (u128::from(high) << 64)
}

/// Load the GDT (code, data, TSS), the segment registers, TR and the IDT.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        // Only the address of the static is taken; the CPU alone uses it as a stack.
        let top = core::ptr::addr_of!(IST_STACK) as u64 + 32 * 1024;
        tss.interrupt_stack_table[0] = VirtAddr::new(top);
        tss
    });
    let gdt = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        assert_eq!((code.0, data.0, tss_sel.0), (CODE_SEL, DATA_SEL, TSS_SEL));
        gdt
    });
    gdt.load();
    // SAFETY: the selectors index the descriptors just loaded.
    unsafe {
        CS::set_reg(SegmentSelector(CODE_SEL));
        for load in [
            DS::set_reg,
            ES::set_reg,
            SS::set_reg,
            FS::set_reg,
            GS::set_reg,
        ] {
            load(SegmentSelector(DATA_SEL));
        }
        load_tss(SegmentSelector(TSS_SEL));
    }
    let idt = IDT.call_once(|| {
        let mut idt = [0u128; 256];
        // SAFETY: the table is defined in the assembly above and never written.
        let stubs = unsafe { &*core::ptr::addr_of!(exc_stub_table) };
        for (v, &stub) in stubs.iter().enumerate() {
            let ist = if v == 2 || v == 8 { 1 } else { 0 };
            idt[v] = idt_entry(stub, ist);
        }
        idt
    });
    let ptr = DescriptorTablePointer {
        limit: (256 * 16 - 1) as u16,
        base: VirtAddr::new(idt.as_ptr() as u64),
    };
    // SAFETY: the IDT is static and its entries point at the stubs above.
    unsafe { lidt(&ptr) };
}

/// Base address of the hypervisor's TSS (for the VMCS host state).
pub fn tss_base() -> u64 {
    TSS.get().map_or(0, |t| t as *const TaskStateSegment as u64)
}

/// Mask both legacy PICs: the hypervisor runs with interrupts off and polls.
pub fn mask_pic() {
    // SAFETY: writing the PICs' interrupt mask registers.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
}

/// End the Bochs run (its shutdown port), or halt forever elsewhere.
pub fn shutdown() -> ! {
    crate::serial::flush();
    for &b in b"Shutdown" {
        // SAFETY: Bochs' 0x8900 port; elsewhere an unused port.
        unsafe { Port::<u8>::new(0x8900).write(b) };
    }
    // QEMU's isa-debug-exit, if present (handy when booting with -kernel).
    // SAFETY: an I/O port write with no memory effects.
    unsafe { Port::<u8>::new(0xf4).write(0x10) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
