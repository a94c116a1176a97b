/* Entry of the shape guests (64-bit, per the boot ABI): a stack of our own,
 * main(), then its status to the debug-exit port. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    lea stack_top(%rip), %rsp
    call main
    mov $0xf4, %dx
    out %al, (%dx)
1:  hlt
    jmp 1b

    .section .bss
    .balign 16
    .space 65536
stack_top:

    .section .note.GNU-stack, "", @progbits
