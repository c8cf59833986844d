/* hello: prints its pid and arguments. */
#include "libc.h"

int main(int argc, char **argv)
{
	char line[256];
	int n = snprintf(line, sizeof line, "hello: pid %ld argc %d", sys_getpid(), argc);
	for (int i = 1; i < argc && n < (int)sizeof line; i++)
		n += snprintf(line + n, sizeof line - (size_t)n, " %s", argv[i]);
	printf("%s\n", line);
	return 0;
}
