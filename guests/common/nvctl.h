/* Helpers shared by nvmm and l1work: clocks, atomic files, pidfiles, the verify/corrupt clients. */
#ifndef NESTVIRT_NVCTL_H
#define NESTVIRT_NVCTL_H

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Exit codes common to both tools (documented in guests/README.md). */
#define EXIT_OK       0
#define EXIT_FAIL     1 /* runtime failure, or a verify that found bad data */
#define EXIT_USAGE    2 /* bad arguments */
#define EXIT_TIMEOUT  3 /* verify: no answer within --timeout */
#define EXIT_NOTARGET 4 /* verify/corrupt: pidfile unreadable or the process is gone */

static const char *g_prog = "nestvirt";

/* One diagnostic line on stderr, then exit with the given code. */
__attribute__((format(printf, 2, 3), noreturn))
static void die(int code, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", g_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

/* getopt_long stopped on an option CMD does not know, or on one missing its value. */
__attribute__((noreturn))
static void die_bad_option(const char *cmd, char **argv)
{
	die(EXIT_USAGE, "%s: unknown option or missing value: '%s'", cmd, argv[optind - 1]);
}

/* Every command takes options only: anything left after them is a usage error. */
static void need_no_args(const char *cmd, int argc, char **argv)
{
	if (optind != argc)
		die(EXIT_USAGE, "%s: unexpected argument '%s'", cmd, argv[optind]);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Strict unsigned parse: the whole string must be a number within [lo, hi]. */
static uint64_t parse_u64(const char *opt, const char *s, uint64_t lo, uint64_t hi)
{
	char *end;
	unsigned long long v;

	errno = 0;
	if (!s || !*s || *s == '-')
		die(EXIT_USAGE, "%s: expected a number, got '%s'", opt, s ? s : "");
	v = strtoull(s, &end, 0);
	if (errno || *end)
		die(EXIT_USAGE, "%s: expected a number, got '%s'", opt, s);
	if (v < lo || v > hi)
		die(EXIT_USAGE, "%s: %llu out of range [%llu, %llu]", opt, v,
		    (unsigned long long)lo, (unsigned long long)hi);
	return v;
}

static double parse_pos_double(const char *opt, const char *s)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || !*s || *end || !(v >= 0) || v > 1e9)
		die(EXIT_USAGE, "%s: expected a non-negative number, got '%s'", opt, s);
	return v;
}

/* Write the whole file under a temporary name and rename it, so readers never see a partial line. */
static int write_atomic(const char *path, const char *buf, size_t len)
{
	char tmp[4096];
	size_t off = 0;
	int fd;

	if (snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid()) >= (int)sizeof tmp)
		return -1;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	while (off < len) {
		ssize_t n = write(fd, buf + off, len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			close(fd);
			unlink(tmp);
			return -1;
		}
		off += (size_t)n;
	}
	if (close(fd) < 0 || rename(tmp, path) < 0) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

/* Read a small file into buf (NUL-terminated); returns length or -1. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
	ssize_t n, tot = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	while ((size_t)tot < cap - 1) {
		n = read(fd, buf + tot, cap - 1 - (size_t)tot);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		tot += n;
	}
	close(fd);
	buf[tot] = 0;
	return tot;
}

static void write_pidfile(const char *path)
{
	char b[32];
	int n = snprintf(b, sizeof b, "%d\n", (int)getpid());

	if (path && write_atomic(path, b, (size_t)n) < 0)
		die(EXIT_FAIL, "cannot write pidfile %s: %s", path, strerror(errno));
}

/* Remove our pidfile at a clean exit, but only if it still names us (never a successor's). */
static void remove_pidfile(const char *path)
{
	char b[64];

	if (path && read_small(path, b, sizeof b) > 0 && atoi(b) == (int)getpid())
		unlink(path);
}

static pid_t read_pid(const char *path)
{
	char b[64], *end;
	long v;

	if (read_small(path, b, sizeof b) <= 0)
		return -1;
	v = strtol(b, &end, 10);
	if (v <= 1 || (*end && *end != '\n'))
		return -1;
	return (pid_t)v;
}

/* The "seq" of the result line in path, or 0 when the file is absent or has none. */
static uint64_t read_seq(const char *path, char *line, size_t cap)
{
	char *p;

	line[0] = 0;
	if (read_small(path, line, cap) <= 0)
		return 0;
	p = strstr(line, "\"seq\":");
	return p ? strtoull(p + 6, NULL, 10) : 0;
}

static pid_t ctl_target(const char *pidfile)
{
	pid_t pid;

	if (!pidfile)
		die(EXIT_USAGE, "--pidfile is required");
	pid = read_pid(pidfile);
	if (pid < 0)
		die(EXIT_NOTARGET, "cannot read a pid from %s", pidfile);
	return pid;
}

/* `PROG corrupt --pidfile P`: ask the running instance to damage its own data (test hook). */
static int ctl_corrupt(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "pidfile", required_argument, 0, 'p' }, { 0, 0, 0, 0 } };
	const char *pidfile = NULL;
	pid_t pid;
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == 'p')
			pidfile = optarg;
		else
			die_bad_option("corrupt", argv);
	}
	need_no_args("corrupt", argc, argv);
	pid = ctl_target(pidfile);
	if (kill(pid, SIGUSR2) < 0)
		die(EXIT_NOTARGET, "cannot signal pid %d: %s", (int)pid, strerror(errno));
	return EXIT_OK;
}

/* `PROG verify --pidfile P --result F [--timeout S]`: request a verify and wait for its line. */
static int ctl_verify(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "pidfile", required_argument, 0, 'p' },
		{ "result", required_argument, 0, 'r' },
		{ "timeout", required_argument, 0, 't' }, { 0, 0, 0, 0 } };
	const char *pidfile = NULL, *result = NULL;
	double timeout = 10;
	static char line[65536];
	uint64_t seq0, deadline;
	pid_t pid;
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == 'p')
			pidfile = optarg;
		else if (c == 'r')
			result = optarg;
		else if (c == 't')
			timeout = parse_pos_double("--timeout", optarg);
		else
			die_bad_option("verify", argv);
	}
	need_no_args("verify", argc, argv);
	if (!result)
		die(EXIT_USAGE, "verify: --result is required");
	pid = ctl_target(pidfile);
	seq0 = read_seq(result, line, sizeof line);
	if (kill(pid, SIGUSR1) < 0)
		die(EXIT_NOTARGET, "cannot signal pid %d: %s", (int)pid, strerror(errno));
	deadline = now_ns() + (uint64_t)(timeout * 1e9);
	for (;;) {
		struct timespec ts = { 0, 20 * 1000 * 1000 };

		if (read_seq(result, line, sizeof line) > seq0) {
			size_t n = strlen(line);

			/* print exactly one line, whatever the file's trailing whitespace */
			while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
				line[--n] = 0;
			printf("%s\n", line);
			return strstr(line, "\"ok\":true") ? EXIT_OK : EXIT_FAIL;
		}
		if (kill(pid, 0) < 0 && errno == ESRCH)
			die(EXIT_NOTARGET, "pid %d exited before answering the verify", (int)pid);
		if (now_ns() >= deadline)
			die(EXIT_TIMEOUT, "verify timed out after %gs waiting for seq > %llu in %s",
			    timeout, (unsigned long long)seq0, result);
		nanosleep(&ts, NULL);
	}
}

struct subcmd {
	const char *name;
	int (*run)(int argc, char **argv);
};

/* Run the subcommand named by argv[1] from a NULL-terminated table; usage + exit 2 otherwise. */
static int dispatch(int argc, char **argv, const struct subcmd *cmds, void (*usage)(void))
{
	const char *cmd;

	if (argc < 2) {
		usage();
		die(EXIT_USAGE, "missing subcommand");
	}
	cmd = argv[1];
	argc--;
	argv++;
	optind = 1; /* each subcommand parses its own options from a fresh getopt state */
	for (; cmds->name; cmds++)
		if (!strcmp(cmd, cmds->name))
			return cmds->run(argc, argv);
	if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help")) {
		usage();
		return EXIT_OK;
	}
	usage();
	die(EXIT_USAGE, "unknown subcommand '%s'", cmd);
}

#endif
