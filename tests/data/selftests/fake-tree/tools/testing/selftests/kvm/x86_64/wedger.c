#include <sched.h>
#include <stdio.h>

#include "nestvirt_only.h"

/*
 * Makes a nestvirt L1 stop answering: a SCHED_FIFO busy loop with RT throttling off starves
 * every other task on L1's one vCPU, the runner's own deadline included. Outside such an L1
 * it refuses, so it never starves a real host.
 */
int main(void)
{
	struct sched_param param = { .sched_priority = 99 };
	FILE *f;

	if (!inside_nestvirt_l1()) {
		printf("1..0 # SKIP - only inside a nestvirt L1\n");
		return 4;
	}
	f = fopen("/proc/sys/kernel/sched_rt_runtime_us", "w");
	if (f) {
		fputs("-1", f);
		fclose(f);
	}
	if (sched_setscheduler(0, SCHED_FIFO, &param))
		return 1;
	for (;;)
		;
}
