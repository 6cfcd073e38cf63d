/* Deliberately does not compile: its build failure must not stop the other tests. */
int main(void)
{
	return undeclared_symbol;
}
