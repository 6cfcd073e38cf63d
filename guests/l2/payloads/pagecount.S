/* L2 payload: bump byte 0 of every region page once per pass, so the VMM can check memory. */
#include "mailbox.h"
#define PAYLOAD_KIND KIND_PAGECOUNT

#include "common.inc"

main:
	rdtsc
	movl	%eax, MB_SCRATCH	/* pass start TSC, so reports also carry a pass cost */
	movl	%edx, MB_SCRATCH+4
	movl	MB_PAGES, %ecx		/* ecx: page count (re-read each pass; VMM never changes it) */
	xorl	%edi, %edi		/* edi: page index */
	movw	$REGION_SEG, %bx	/* bx: segment of page edi */
1:
	cmpl	%ecx, %edi
	jae	3f
	movw	%bx, %es
	cmpl	$0, MB_PASS		/* the index word is written only on the first pass */
	jne	2f
	movl	%edi, %es:4
2:
	incb	%es:0			/* one instruction, so a stopped vCPU never shows half an update */
	incl	%edi
	addw	$0x100, %bx		/* 0x100 paragraphs = 4 KiB */
	jmp	1b
3:
	rdtsc
	subl	MB_SCRATCH, %eax
	sbbl	MB_SCRATCH+4, %edx
	movl	%eax, MB_CYCLES
	movl	%edx, MB_CYCLES+4
	movl	%ecx, MB_ITERS_DONE
	incl	MB_PASS			/* after this, every page must hold (pass & 0xff) */
	outb	%al, $PORT_REPORT
	jmp	main

banner:	.asciz "nestvirt L2 pagecount\n"

