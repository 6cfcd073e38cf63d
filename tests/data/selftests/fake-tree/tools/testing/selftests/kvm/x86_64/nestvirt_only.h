/* The fakes that harm their kernel run only inside a nestvirt L1, never on a real host. */
#ifndef NESTVIRT_ONLY_H
#define NESTVIRT_ONLY_H

#include <stdio.h>
#include <string.h>

/* True when the kernel command line carries nestvirt's per-run SSH key. */
static inline int inside_nestvirt_l1(void)
{
	char cmdline[4096] = "";
	FILE *f = fopen("/proc/cmdline", "r");

	if (f) {
		if (!fgets(cmdline, sizeof(cmdline), f))
			cmdline[0] = '\0';
		fclose(f);
	}
	return strstr(cmdline, "nestvirt.sshkey=") != NULL;
}

#endif
