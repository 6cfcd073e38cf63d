/* L2 payload: time MB_ITERS x OUT to PORT_NOP, each one a full exit to the VMM in L1 userspace. */
#include "mailbox.h"
#define PAYLOAD_KIND KIND_PIO
#define LOOP_BODY outb %al, $PORT_NOP

#include "timeloop.inc"

banner:	.asciz "nestvirt L2 pioloop\n"
