/* L2 payload: MB_ITERS x a register-only loop per report, no exit in between: L1's vCPU stays
 * in guest mode (running L2) nearly all the time, so a stop of L1 almost always lands there. */
#include "mailbox.h"
#define PAYLOAD_KIND KIND_SPIN
#define LOOP_BODY nop

#include "timeloop.inc"

banner:	.asciz "nestvirt L2 spinloop\n"
