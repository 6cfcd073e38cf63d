#include <unistd.h>

/* Hangs like a selftest waiting on a vCPU that never exits: only a kill ends it. */
int main(void)
{
	for (;;)
		pause();
}
