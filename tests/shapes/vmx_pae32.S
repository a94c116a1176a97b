/* Built by tests/bochs.rs (gcc -m32), not a C shape: an ELF32 guest entered in
 * protected mode by the boot ABI. */
/* A 32-bit guest (ELF32, entered in protected mode with paging off) that turns on
 * PAE paging and prints through it: VA 0x3fe00000 (PDE 511 of the first PD) maps
 * guest-physical 0 with one PDPT and 2 MiB further with another, so the bytes it
 * reads there say which PDPTEs the CPU uses. Prints "pae:ABAB\n": A under the
 * first PDPT, B after MOV CR3 to the second, A after switching back, B after
 * rewriting PDPTE0 in memory and reloading CR3 with the same value. */
    .code32
    .section .text
    .globl _start
_start:
    mov $stack_top, %esp
    /* pd0: identity 0..1 GiB in 2 MiB pages but PDE 511 -> 0; pd1: the same but
     * PDE 511 -> 2 MiB. */
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, pd0(,%ecx,8)
    mov %eax, pd1(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    movl $0x83, pd0 + 511 * 8
    movl $0x200083, pd1 + 511 * 8
    movl $pd0 + 1, pdpt0
    movl $pd1 + 1, pdpt1
    /* The marker byte at `mark` reads 'A'; at mark + 2 MiB, 'B'. */
    movb $'B', mark + 0x200000
    mov %cr4, %eax
    or $0x20, %eax          /* PAE */
    mov %eax, %cr4
    mov $pdpt0, %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax    /* PG */
    mov %eax, %cr0
    mov $0x3f8, %dx
    mov $'p', %al
    out %al, (%dx)
    mov $'a', %al
    out %al, (%dx)
    mov $'e', %al
    out %al, (%dx)
    mov $':', %al
    out %al, (%dx)
    call show               /* A */
    mov $pdpt1, %eax
    mov %eax, %cr3
    call show               /* B */
    mov $pdpt0, %eax
    mov %eax, %cr3
    call show               /* A */
    movl $pd1 + 1, pdpt0    /* PDPTE0 -> pd1 in memory ... */
    mov %cr3, %eax
    mov %eax, %cr3          /* ... loaded by the same CR3 */
    call show               /* B */
    mov $'\n', %al
    out %al, (%dx)
    xor %eax, %eax
    out %al, $0xf4
2:  hlt
    jmp 2b

/* Print the byte at mark's alias in the last 2 MiB page of the first GiB. */
show:
    movb mark + 0x3fe00000, %al
    out %al, (%dx)
    ret

    .section .data
mark: .byte 'A'

    .section .bss
    .balign 4096
pd0: .space 4096
pd1: .space 4096
    .balign 32
pdpt0: .space 32
    .balign 32
pdpt1: .space 32
    .balign 16
    .space 4096
stack_top:

    .section .note.GNU-stack, "", @progbits
