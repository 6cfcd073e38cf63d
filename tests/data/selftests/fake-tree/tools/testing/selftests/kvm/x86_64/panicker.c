#include <stdio.h>
#include <string.h>

/*
 * Stands for a kernel under test that crashes during a selftest: it panics a nestvirt L1
 * through sysrq. Outside such an L1 (no nestvirt.sshkey= on the command line) it refuses,
 * so it never crashes a real host.
 */
int main(void)
{
	char cmdline[4096] = "";
	FILE *f = fopen("/proc/cmdline", "r");

	if (f) {
		if (!fgets(cmdline, sizeof(cmdline), f))
			cmdline[0] = '\0';
		fclose(f);
	}
	if (!strstr(cmdline, "nestvirt.sshkey=")) {
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
