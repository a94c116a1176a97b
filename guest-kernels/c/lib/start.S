/* The C guests' entry (boot ABI in guest-kernels/README.md): 64-bit mode, the
 * first 4 GiB identity-mapped, interrupts off, no stack. Set RSP to the stack the
 * linker script (guest-kernels/guest.ld) reserves and enter start_kernel(). */
	.section .text._start, "ax"
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	mov $__stack_top, %rsp
	xor %ebp, %ebp
	call start_kernel
1:	hlt
	jmp 1b
	.size _start, . - _start
	.section .note.GNU-stack, "", @progbits
