/* nvrekey: make a restored L1 this run's own. L1 restored from a saved image holds the CRNG
 * state, clock and keys of the boot that was saved; the harness sends one line on L1's
 * control port:
 *
 *     rekey NONCE SEEDHEX EPOCH_NS KEYTYPE KEYBASE64 HOSTKEYBASE64
 *
 * `nvrekey serve CTL EVENTS` (started by init, templates/l1-init.sh.j2) waits on the control
 * port CTL and answers each line on the events port: "NESTVIRT-EVENT rekeyed nonce=N ..." or
 * "NESTVIRT-EVENT rekey-failed nonce=N what=STEP". It is a program, not a shell loop, because
 * everything a restore waits for counts: under TCG a fork and exec in L1 cost milliseconds.
 * `nvrekey` alone reads "SEEDHEX EPOCH_NS KEYTYPE KEYBASE64 HOSTKEYBASE64" on stdin, once.
 *
 * 1. the seed (>= 32 bytes) is credited to the input pool (RNDADDENTROPY) and the CRNG
 *    reseeded at once (RNDRESEEDCRNG): every restore of one image starts from one CRNG
 *    state, and a plain write to /dev/urandom would only reach the CRNG at its next
 *    scheduled reseed;
 * 2. the clock is set (it stood still while the image lay on disk);
 * 3. root's authorized key becomes the run's key (the saving boot's key is gone);
 * 4. the host key (dropbear's own format, made by the harness, which pins it) replaces
 *    every host key dropbear has (dropbear -R reads it in each connection's child).
 * stdin mode: exit 0, or 1 with the failing step on stderr (2: a malformed line, before
 * anything was changed).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_SEED 256
#define AUTH_KEYS "/root/.ssh/authorized_keys"
#define HOST_KEY "/etc/dropbear/dropbear_ed25519_host_key"

static int fail(int code, const char *step)
{
	fprintf(stderr, "nvrekey: %s%s%s\n", step, errno ? ": " : "", errno ? strerror(errno) : "");
	return code;
}

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int b64val(int c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* Decode base64 into out (room for cap bytes); -1 on a bad character or overflow. */
static long b64decode(const char *in, unsigned char *out, size_t cap)
{
	unsigned int acc = 0;
	int bits = 0;
	size_t n = 0;

	for (; *in && *in != '='; in++) {
		int v = b64val((unsigned char)*in);

		if (v < 0)
			return -1;
		acc = (acc << 6) | (unsigned int)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (n >= cap)
				return -1;
			out[n++] = (unsigned char)(acc >> bits);
		}
	}
	return (long)n;
}

/* Write data to path through a temporary file and rename: never a half-written key. */
static int write_file(const char *path, const void *data, size_t len, mode_t mode)
{
	char tmp[256];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.new", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, mode);
	if (fd < 0)
		return -1;
	if (write(fd, data, len) != (ssize_t)len || fchmod(fd, mode) < 0 || close(fd) < 0)
		return -1;
	return rename(tmp, path);
}

/* Apply one rekey line (without "rekey NONCE"); NULL on success, else the failing step.
 * *usage is set when the line itself was malformed (nothing changed then). */
static const char *rekey(const char *line, int *usage)
{
	static char seedhex[2 * MAX_SEED + 2], ktype[64], kb64[2048], hkb64[1024];
	static unsigned char hostkey[768];
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_SEED];
	} req;
	char auth[2200];
	long long epoch_ns;
	struct timespec ts;
	size_t n = 0, len;
	long hklen;
	int fd;

	*usage = 1;
	errno = 0;
	if (sscanf(line, "%514s %lld %63s %2047s %1023s", seedhex, &epoch_ns, ktype, kb64, hkb64) != 5)
		return "expected: SEEDHEX EPOCH_NS KEYTYPE KEYBASE64 HOSTKEYBASE64";
	len = strlen(seedhex);
	if (len % 2 || len / 2 < 32 || len / 2 > MAX_SEED)
		return "the seed must be 32..256 bytes as hex";
	for (size_t i = 0; i + 1 < len; i += 2) {
		int hi = hexval(seedhex[i]), lo = hexval(seedhex[i + 1]);

		if (hi < 0 || lo < 0)
			return "the seed is not hex";
		req.buf[n++] = (unsigned char)(hi << 4 | lo);
	}
	hklen = b64decode(hkb64, hostkey, sizeof(hostkey));
	if (hklen <= 0)
		return "the host key is not base64";
	*usage = 0;
	fd = open("/dev/urandom", O_WRONLY);
	if (fd < 0)
		return "seed: /dev/urandom";
	req.info.entropy_count = (int)(n * 8);
	req.info.buf_size = (int)n;
	if (ioctl(fd, RNDADDENTROPY, &req) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0) {
		close(fd);
		return "seed";
	}
	close(fd);

	ts.tv_sec = (time_t)(epoch_ns / 1000000000LL);
	ts.tv_nsec = (long)(epoch_ns % 1000000000LL);
	if (clock_settime(CLOCK_REALTIME, &ts) < 0)
		return "clock";

	snprintf(auth, sizeof(auth), "%s %s nestvirt\n", ktype, kb64);
	if (write_file(AUTH_KEYS, auth, strlen(auth), 0600) < 0)
		return "authorized-key";

	mkdir("/etc/dropbear", 0700);
	/* the saving boot's keys (its one login made them): never served again */
	unlink("/etc/dropbear/dropbear_rsa_host_key");
	unlink("/etc/dropbear/dropbear_ecdsa_host_key");
	unlink("/etc/dropbear/dropbear_dss_host_key");
	if (write_file(HOST_KEY, hostkey, (size_t)hklen, 0600) < 0)
		return "host-key";
	return NULL;
}

/* One event line on the events port, opened per line as init's own `ev` does. */
static void event(const char *events, const char *fmt, const char *nonce, const char *what)
{
	char line[512], up[64] = "?";
	FILE *f = fopen("/proc/uptime", "r");
	int fd;

	if (f) {
		if (fscanf(f, "%63s", up) != 1)
			strcpy(up, "?");
		fclose(f);
	}
	snprintf(line, sizeof(line), fmt, nonce, what ? what : up);
	fd = open(events, O_WRONLY | O_NOCTTY);
	if (fd >= 0) {
		if (write(fd, line, strlen(line)) < 0)
			perror("nvrekey: events");
		close(fd);
	}
}

/* The control port, raw: bytes as the harness sent them, no echo back. */
static int open_port(const char *path)
{
	struct termios t;
	int fd = open(path, O_RDONLY | O_NOCTTY);

	if (fd < 0)
		return -1;
	if (tcgetattr(fd, &t) == 0) {
		cfmakeraw(&t);
		cfsetispeed(&t, B115200);
		cfsetospeed(&t, B115200);
		t.c_cc[VMIN] = 1;
		t.c_cc[VTIME] = 0;
		tcsetattr(fd, TCSANOW, &t);
	}
	return fd;
}

static int serve(const char *ctl, const char *events)
{
	static char line[8192];
	size_t used = 0;
	int fd = open_port(ctl);

	if (fd < 0)
		return fail(1, "control port");
	for (;;) {
		char *nl;
		ssize_t got = read(fd, line + used, sizeof(line) - 1 - used);

		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return fail(1, "control port read");
		used += (size_t)got;
		line[used] = '\0';
		while ((nl = strchr(line, '\n')) != NULL) {
			char nonce[40] = "";
			int off = 0, usage;
			const char *why;

			*nl = '\0';
			if (sscanf(line, "rekey %39s %n", nonce, &off) == 1 && off > 0) {
				why = rekey(line + off, &usage);
				if (why)
					event(events, "NESTVIRT-EVENT rekey-failed nonce=%s what=%s\n", nonce,
					      usage ? "malformed" : why);
				else
					event(events, "NESTVIRT-EVENT rekeyed nonce=%s uptime=%s\n", nonce, NULL);
			}
			used -= (size_t)(nl + 1 - line);
			memmove(line, nl + 1, used + 1);
		}
		if (used >= sizeof(line) - 1)
			used = 0; /* an overlong line: dropped */
	}
}

int main(int argc, char **argv)
{
	static char line[8192];
	const char *why;
	int usage;

	if (argc == 4 && strcmp(argv[1], "serve") == 0)
		return serve(argv[2], argv[3]);
	if (argc != 1) {
		fprintf(stderr, "usage: nvrekey < LINE  |  nvrekey serve CTLPORT EVENTSPORT\n");
		return 2;
	}
	if (!fgets(line, sizeof(line), stdin))
		return fail(2, "no line on stdin");
	why = rekey(line, &usage);
	if (why)
		return fail(usage ? 2 : 1, why);
	return 0;
}
