#include <stdio.h>

int main(void)
{
	puts("ok 1 passer");
	return 0;
}
