/* Linux's retpoline and return thunks (arch/x86/lib/retpoline.S in 6.1), for the
 * C guests built with -mindirect-branch=thunk-extern -mfunction-return=thunk-extern:
 * gcc then calls every function pointer through __x86_indirect_thunk_<reg> and
 * ends every function with `jmp __x86_return_thunk`, as a distribution kernel's
 * code runs once its boot-time patching chose retpolines (Debian's 6.1 in Bochs
 * does). The retpoline's inner call lands on a store of the real destination over
 * its own return address; the RET then goes there, never to the speculation trap. */
	.macro THUNK reg
	.section .text.__x86_indirect_thunk_\reg, "ax"
	.globl __x86_indirect_thunk_\reg
	.type __x86_indirect_thunk_\reg, @function
	.p2align 5
__x86_indirect_thunk_\reg:
	call 1f
2:	pause
	lfence
	jmp 2b
1:	mov %\reg, (%rsp)
	ret
	int3
	.size __x86_indirect_thunk_\reg, . - __x86_indirect_thunk_\reg
	.endm

	THUNK rax
	THUNK rbx
	THUNK rcx
	THUNK rdx
	THUNK rsi
	THUNK rdi
	THUNK rbp
	THUNK r8
	THUNK r9
	THUNK r10
	THUNK r11
	THUNK r12
	THUNK r13
	THUNK r14
	THUNK r15

	.section .text.__x86_return_thunk, "ax"
	.globl __x86_return_thunk
	.type __x86_return_thunk, @function
	.p2align 6
__x86_return_thunk:
	ret
	int3
	.size __x86_return_thunk, . - __x86_return_thunk
	.section .note.GNU-stack, "", @progbits
