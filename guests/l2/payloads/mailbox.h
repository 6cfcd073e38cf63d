/* Guest-physical layout and port numbers shared by nvmm.c and the real-mode payloads. */
#ifndef NESTVIRT_MAILBOX_H
#define NESTVIRT_MAILBOX_H

/* Mailbox at GPA 0x500: free low memory in real mode (past the IVT and BDA area). */
#define MB_BASE        0x500
#define MB_PAGES       0x500 /* u32, VMM -> payload: pages in the pagecount region */
#define MB_ITERS       0x504 /* u32, VMM -> payload: loop iterations per report */
#define MB_PASS        0x508 /* u32, payload -> VMM: completed passes (VMM zeroes it) */
#define MB_KIND        0x50C /* u32, payload -> VMM: which payload is running (KIND_*) */
#define MB_CYCLES      0x510 /* u64, payload -> VMM: TSC delta of the last pass */
#define MB_ITERS_DONE  0x518 /* u32, payload -> VMM: iterations (or pages) in that delta */
#define MB_MAGIC       0x51C /* u32, VMM -> payload: MB_MAGIC_VALUE once the block is valid */
#define MB_SCRATCH     0x520 /* 32 bytes private to the payload (it keeps its start TSC here) */
#define MB_SIZE        0x40

#define MB_MAGIC_VALUE 0x424D564E /* "NVMB" little-endian */

#define PAYLOAD_GPA    0x1000  /* payloads are linked and loaded here, entered at cs:ip 0:0x1000 */
#define PAYLOAD_MAX    0xD000  /* payload must end below the stack page */
#define STACK_TOP      0xF000  /* initial sp (ss = 0) */
#define REGION_GPA     0x10000 /* page i of the pagecount region is at REGION_GPA + i*4096 */
#define REGION_SEG     0x1000  /* real-mode segment of page 0; page i uses REGION_SEG + i*0x100 */
#define REGION_MAX_PAGES 240   /* ES = 0x1000 + i*0x100 must stay <= 0xFFFF (below 1 MiB) */

#define PORT_REPORT    0x10 /* out: mailbox holds a new report */
#define PORT_NOP       0x11 /* out: counted and ignored (pioloop's exit generator) */
#define PORT_FAULT     0x12 /* out: CPU exception, al = vector, ip/cs/flags at ss:sp (fatal) */
#define PORT_CONSOLE   0xE9 /* out: one console byte, appended to the L2 serial log */

#define KIND_PAGECOUNT 1
#define KIND_CPUID     2
#define KIND_VMMCALL   3 /* AMD VMMCALL hypercall loop */
#define KIND_VMCALL    4 /* Intel VMCALL hypercall loop */
#define KIND_PIO       5
#define KIND_SPIN      6 /* spinloop: exits only to report (L1 stays in guest mode) */

#endif
