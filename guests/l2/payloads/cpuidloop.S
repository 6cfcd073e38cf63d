/* L2 payload: time MB_ITERS x CPUID(0), each one an exit to L1's KVM (handled in L1 kernel). */
#include "mailbox.h"
#define PAYLOAD_KIND KIND_CPUID
#define LOOP_BODY xorl %eax, %eax; cpuid

#include "timeloop.inc"

banner:	.asciz "nestvirt L2 cpuidloop\n"
