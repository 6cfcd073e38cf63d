#include <stdio.h>

#include "nestvirt_only.h"

/*
 * Stands for a kernel under test that crashes during a selftest: it panics a nestvirt L1
 * through sysrq. Outside such an L1 it refuses, so it never crashes a real host.
 */
int main(void)
{
	FILE *f;

	if (!inside_nestvirt_l1()) {
		printf("1..0 # SKIP - only inside a nestvirt L1\n");
		return 4;
	}
	printf("1..1\n");
	fflush(stdout);
	f = fopen("/proc/sysrq-trigger", "w");
	if (!f)
		return 1;
	fputs("c", f);
	fclose(f);
	return 1; /* not reached when the panic happens */
}
