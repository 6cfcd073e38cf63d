#include <stdio.h>

/* What TEST_ASSERT prints on failure (lib/assert.c), then its exit status. */
int main(void)
{
	fprintf(stderr, "==== Test Assertion Failure ====\n"
		"  failer.c:7: ret == 0\n"
		"  pid=1 tid=1 errno=22 - Invalid argument\n"
		"  KVM_RUN failed, rc: -1\n");
	return 254;
}
