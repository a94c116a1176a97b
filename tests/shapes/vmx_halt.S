/* Built by tests/bochs.rs (gcc -m32), not a C shape: an ELF32 guest entered in
 * protected mode by the boot ABI. It prints "halting\n" on COM1, then halts with
 * interrupts off, as a kernel's `poweroff -f` without ACPI ends: nothing can wake
 * it, so the hypervisor ends the run with status 0 and says it halted. */
    .code32
    .section .text
    .globl _start
_start:
    mov $msg, %esi
1:  movb (%esi), %al
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    outb %al, %dx
    inc %esi
    jmp 1b
2:  cli
    hlt
    /* Not reached: a wake-up would end the run with status 1. */
    mov $1, %al
    outb %al, $0xf4
3:  jmp 3b

    .section .rodata
msg: .asciz "halting\n"
