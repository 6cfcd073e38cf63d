#include <stdio.h>

/* What TEST_REQUIRE prints through ksft_exit_skip(), then KSFT_SKIP. */
int main(void)
{
	printf("Random seed: 0x6b8b4567\n1..0 # SKIP - Requirement not met: fake_feature()\n");
	return 4;
}
