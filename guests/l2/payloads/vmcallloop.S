/* L2 payload: time MB_ITERS hypercalls; KVM answers them in L1's kernel (no userspace exit). */
#include "mailbox.h"
#ifdef INTEL_VMCALL
#define PAYLOAD_KIND KIND_VMCALL
#define HYPERCALL vmcall
#else
#define PAYLOAD_KIND KIND_VMMCALL
#define HYPERCALL vmmcall
#endif
/* eax = 0 is no KVM hypercall: KVM returns -KVM_ENOSYS in eax, which is all we need. */
#define LOOP_BODY xorl %eax, %eax; HYPERCALL

#include "timeloop.inc"

#ifdef INTEL_VMCALL
banner:	.asciz "nestvirt L2 vmcallloop (vmcall)\n"
#else
banner:	.asciz "nestvirt L2 vmcallloop (vmmcall)\n"
#endif
