/* l1work: L1 memory workload that keeps rewriting a region with a checkable pattern. */
#define _GNU_SOURCE
#include "../common/nvctl.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#define PAGE       4096u
#define WORDS      (PAGE / 8)
#define BATCH      16           /* pages between throttle checks */
#define MAX_BAD    8            /* first_bad entries kept */
#define CORRUPT_PAGE 5
#define STATUS_NS  (100 * 1000 * 1000ull) /* status and progress lines, 10 a second */
#define SLEEP_MAX_NS (10 * 1000 * 1000ull) /* throttle sleeps in slices so requests are seen */
#define LAG_MAX_NS (100 * 1000 * 1000ull)  /* further behind than this: no catch-up burst */
#define GOLDEN     0x9E3779B97F4A7C15ull

struct bad {
	uint64_t page, word, found, expected;
};

/* One worker and its slice; only the worker writes the slice or these fields (except atomics). */
struct slice {
	pthread_t th;
	int id;
	uint64_t first, n;      /* global page range [first, first + n) */
	uint64_t n_sweep;       /* pages rewritten per sweep: n, or the hot set [0, n_sweep) */
	uint64_t perm_a, perm_ainv, perm_c; /* --pattern random: sweep step i writes (a*i+c) mod n_sweep */
	uint32_t gen;           /* generation of the last complete sweep (0 = initial fill) */
	uint64_t pos;           /* next page to write in the current sweep, slice-relative */
	int corrupt_sticky;     /* re-damage page CORRUPT_PAGE after each rewrite */
	_Atomic uint64_t sweeps, bytes;
	uint64_t seen_epoch;
	/* verify result for the current epoch */
	uint64_t bad_pages, nbad;
	struct bad bad[MAX_BAD];
};

static uint8_t *g_mem;
static uint64_t g_pages, g_nthreads;
static double g_rate; /* bytes/s per thread, 0 = unthrottled */
static struct slice *g_sl;
/* --entropy N: the first WORDS/N words of a page are hashed (incompressible), the rest repeat
 * one word, so a page compresses about N times; 0 keeps the original per-word pattern. */
static uint64_t g_entropy, g_random_words = WORDS;
enum { PAT_SEQ, PAT_RANDOM, PAT_HOT };
static int g_pattern = PAT_SEQ;
static uint64_t g_hot_pct = 10;

static _Atomic uint64_t g_verify_epoch; /* bumped by main per verify request */
static _Atomic int g_corrupt_req;
static _Atomic int g_corrupted;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done_cv = PTHREAD_COND_INITIALIZER, g_resume_cv = PTHREAD_COND_INITIALIZER;
static uint64_t g_done_count, g_resume_epoch;
static pthread_barrier_t g_ready;
/* --readers N: threads that only read the region (their progress is what a throttle costs a
 * vCPU that dirties nothing); --pin: thread k runs on CPU k mod the CPU count, writers first */
static uint64_t g_nreaders;
static int g_pin;
static _Atomic uint64_t g_read_bytes;
static pthread_t *g_readers;

/* splitmix64's finaliser: every output bit depends on every input bit (deflate finds nothing) */
static inline uint64_t mix64(uint64_t z)
{
	z += GOLDEN;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static inline uint64_t pattern(uint64_t page, uint32_t gen, uint64_t j)
{
	uint64_t base = (page << 32) | gen;

	if (!g_entropy)
		return base ^ (j * GOLDEN);
	return j < g_random_words ? mix64(base ^ (j * GOLDEN)) : base;
}

static void write_page(uint64_t page, uint32_t gen)
{
	uint64_t *w = (uint64_t *)(g_mem + page * PAGE), base = (page << 32) | gen, j;

	if (g_entropy) {
		for (j = 0; j < g_random_words; j++)
			w[j] = mix64(base ^ (j * GOLDEN));
		for (; j < WORDS; j++)
			w[j] = base;
		return;
	}
	for (j = 0; j < WORDS; j++)
		w[j] = base ^ (j * GOLDEN);
}

static uint64_t gcd_u64(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

/* inverse of a modulo m (gcd(a, m) == 1), by the extended Euclid */
static uint64_t inv_mod(uint64_t a, uint64_t m)
{
	__int128 t = 0, nt = 1, r = m, nr = a % m;

	while (nr) {
		__int128 q = r / nr, x;

		x = t - q * nt; t = nt; nt = x;
		x = r - q * nr; r = nr; nr = x;
	}
	return (uint64_t)(t < 0 ? t + m : t);
}

/* Slice-relative page written at sweep step i (i < n_sweep). */
static inline uint64_t sweep_page(const struct slice *s, uint64_t i)
{
	if (g_pattern != PAT_RANDOM)
		return i;
	return (uint64_t)(((unsigned __int128)s->perm_a * i + s->perm_c) % s->n_sweep);
}

/* Sweep step at which slice-relative page x (< n_sweep) is written: sweep_page's inverse. */
static inline uint64_t sweep_step(const struct slice *s, uint64_t x)
{
	if (g_pattern != PAT_RANDOM)
		return x;
	return (uint64_t)(((unsigned __int128)((x + s->n_sweep - s->perm_c) % s->n_sweep) *
			   s->perm_ainv) % s->n_sweep);
}

static void setup_sweep(struct slice *s)
{
	s->n_sweep = s->n;
	if (g_pattern == PAT_HOT) {
		s->n_sweep = s->n * g_hot_pct / 100;
		if (s->n_sweep < 1)
			s->n_sweep = 1;
	}
	if (g_pattern == PAT_RANDOM) {
		/* a multiplier far from 1 scatters consecutive steps over the slice */
		uint64_t a = (s->n_sweep * 5) / 8 + 1;

		while (s->n_sweep > 1 && gcd_u64(a, s->n_sweep) != 1)
			a++;
		s->perm_a = a % s->n_sweep ? a % s->n_sweep : 1;
		s->perm_ainv = s->n_sweep > 1 ? inv_mod(s->perm_a, s->n_sweep) : 1;
		s->perm_c = s->n_sweep / 3;
	}
}

static void damage(void)
{
	g_mem[CORRUPT_PAGE * PAGE + 17] ^= 0xA5; /* one byte, inside word 2 */
}

/* Pages written at sweep steps [0,pos) must be at gen+1, the rest of the sweep at gen, and
 * pages outside a hot set at 0: the worker knows its own edge. */
static void verify_slice(struct slice *s)
{
	uint64_t i, j;

	s->bad_pages = 0;
	s->nbad = 0;
	for (i = 0; i < s->n; i++) {
		uint64_t page = s->first + i;
		uint32_t gen = i >= s->n_sweep ? 0 : sweep_step(s, i) < s->pos ? s->gen + 1 : s->gen;
		const uint64_t *w = (const uint64_t *)(g_mem + page * PAGE);

		for (j = 0; j < WORDS; j++) {
			uint64_t e = pattern(page, gen, j);

			if (w[j] == e)
				continue;
			if (s->nbad < MAX_BAD)
				s->bad[s->nbad++] = (struct bad){ page, j, w[j], e };
			s->bad_pages++;
			break; /* one entry per bad page */
		}
	}
}

/* Called by a worker at a page boundary: serve verify/corrupt requests addressed to it. */
static int serve_requests(struct slice *s)
{
	uint64_t ep = atomic_load(&g_verify_epoch);
	int served = 0;

	if (atomic_load(&g_corrupt_req) && CORRUPT_PAGE >= s->first &&
	    CORRUPT_PAGE < s->first + s->n) {
		damage();
		s->corrupt_sticky = 1;
		atomic_store(&g_corrupted, 1);
		atomic_store(&g_corrupt_req, 0);
	}
	if (ep != s->seen_epoch) {
		verify_slice(s);
		s->seen_epoch = ep;
		pthread_mutex_lock(&g_mu);
		g_done_count++;
		pthread_cond_signal(&g_done_cv);
		/* stay still until main has collected every slice, so the result is one snapshot */
		while (g_resume_epoch < ep)
			pthread_cond_wait(&g_resume_cv, &g_mu);
		pthread_mutex_unlock(&g_mu);
		served = 1;
	}
	return served;
}

static int requests_pending(struct slice *s)
{
	return atomic_load(&g_verify_epoch) != s->seen_epoch ||
	       (atomic_load(&g_corrupt_req) && CORRUPT_PAGE >= s->first &&
		CORRUPT_PAGE < s->first + s->n);
}

static void pin_to(pthread_t th, uint64_t k)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	cpu_set_t cs;

	if (!g_pin || n < 1)
		return;
	CPU_ZERO(&cs);
	CPU_SET((int)(k % (uint64_t)n), &cs);
	if (pthread_setaffinity_np(th, sizeof cs, &cs))
		fprintf(stderr, "l1work: cannot pin thread %llu\n", (unsigned long long)k);
}

/* Reads every word of the region, page by page, forever; counts the bytes read. */
static void *reader(void *arg)
{
	volatile uint64_t sink = 0;
	uint64_t p = (uint64_t)(uintptr_t)arg % g_pages, j, acc;

	for (;;) {
		const uint64_t *w = (const uint64_t *)(g_mem + p * PAGE);

		for (j = 0, acc = 0; j < WORDS; j++)
			acc += w[j];
		sink += acc;
		atomic_fetch_add_explicit(&g_read_bytes, PAGE, memory_order_relaxed);
		if (++p == g_pages)
			p = 0;
	}
	return NULL;
}

static void *worker(void *arg)
{
	struct slice *s = arg;
	uint64_t i, base_ns, base_bytes = 0, since = 0;

	for (i = 0; i < s->n; i++) /* touch the whole slice with generation 0 */
		write_page(s->first + i, 0);
	pthread_barrier_wait(&g_ready);
	base_ns = now_ns();
	for (;;) {
		uint64_t page = s->first + sweep_page(s, s->pos);

		if (serve_requests(s)) {
			base_ns = now_ns(); /* the pause must not turn into a catch-up burst */
			base_bytes = 0;
		}
		write_page(page, s->gen + 1);
		if (s->corrupt_sticky && page == CORRUPT_PAGE)
			damage();
		atomic_fetch_add_explicit(&s->bytes, PAGE, memory_order_relaxed);
		base_bytes += PAGE;
		if (++s->pos == s->n_sweep) {
			s->pos = 0;
			s->gen++;
			atomic_fetch_add_explicit(&s->sweeps, 1, memory_order_relaxed);
		}
		if (g_rate <= 0 || ++since < BATCH)
			continue;
		since = 0;
		for (;;) {
			uint64_t target = base_ns + (uint64_t)((double)base_bytes * 1e9 / g_rate);
			uint64_t t = now_ns(), d;
			struct timespec ts;

			if (t >= target) {
				if (t - target > LAG_MAX_NS) {
					base_ns = t;
					base_bytes = 0;
				}
				break;
			}
			if (requests_pending(s))
				break;
			d = target - t < SLEEP_MAX_NS ? target - t : SLEEP_MAX_NS;
			ts.tv_sec = 0;
			ts.tv_nsec = (long)d;
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

static const char *g_status, *g_result, *g_pidfile;
/* --progress: one "t bytes_written" line per status interval ("t written read" with readers) */
static FILE *g_progress;
static uint64_t g_mib, g_seq;
static double g_rate_total;

static const char *pattern_name(void)
{
	return g_pattern == PAT_RANDOM ? "random" : g_pattern == PAT_HOT ? "hot" : "seq";
}

static uint64_t sweep_pages(void)
{
	uint64_t i, n = 0;

	for (i = 0; i < g_nthreads; i++)
		n += g_sl[i].n_sweep;
	return n;
}

/* The guest's own progress, so its slowdown during migration is measured, not guessed. */
static void write_progress(void)
{
	uint64_t bytes = 0, i;

	if (!g_progress)
		return;
	for (i = 0; i < g_nthreads; i++)
		bytes += atomic_load_explicit(&g_sl[i].bytes, memory_order_relaxed);
	if (g_nreaders)
		fprintf(g_progress, "%.6f %llu %llu\n", (double)now_ns() / 1e9,
			(unsigned long long)bytes,
			(unsigned long long)atomic_load_explicit(&g_read_bytes, memory_order_relaxed));
	else
		fprintf(g_progress, "%.6f %llu\n", (double)now_ns() / 1e9,
			(unsigned long long)bytes);
	fflush(g_progress);
}

static void write_status(const char *state)
{
	char buf[512];
	uint64_t sweeps = 0, bytes = 0, smin = UINT64_MAX, i;
	int n;

	if (!g_status)
		return;
	for (i = 0; i < g_nthreads; i++) {
		uint64_t sw = atomic_load_explicit(&g_sl[i].sweeps, memory_order_relaxed);

		sweeps += sw;
		smin = sw < smin ? sw : smin;
		bytes += atomic_load_explicit(&g_sl[i].bytes, memory_order_relaxed);
	}
	n = snprintf(buf, sizeof buf,
		     "{\"state\":\"%s\",\"pid\":%d,\"sweeps\":%llu,\"sweeps_min\":%llu,\"mib\":%llu,\"threads\":%llu,"
		     "\"rate_mib_s\":%g,\"bytes_written\":%llu,\"verifies\":%llu,\"corrupted\":%s,"
		     "\"entropy\":%llu,\"pattern\":\"%s\",\"sweep_pages\":%llu,\"t\":%.6f}\n",
		     state, (int)getpid(), (unsigned long long)sweeps, (unsigned long long)smin,
		     (unsigned long long)g_mib,
		     (unsigned long long)g_nthreads, g_rate_total, (unsigned long long)bytes,
		     (unsigned long long)g_seq, atomic_load(&g_corrupted) ? "true" : "false",
		     (unsigned long long)g_entropy, pattern_name(), (unsigned long long)sweep_pages(),
		     (double)now_ns() / 1e9);
	if (write_atomic(g_status, buf, (size_t)n) < 0)
		fprintf(stderr, "l1work: cannot write status %s: %s\n", g_status, strerror(errno));
}

/* Main thread: one verify round; workers verify their own slices and wait for the release. */
static void do_verify(void)
{
	char buf[4096];
	size_t o = 0;
	uint64_t bad = 0, shown = 0, i, j, t0 = now_ns();

	g_seq++;
	pthread_mutex_lock(&g_mu);
	g_done_count = 0;
	atomic_store(&g_verify_epoch, g_seq);
	while (g_done_count < g_nthreads)
		pthread_cond_wait(&g_done_cv, &g_mu);
	pthread_mutex_unlock(&g_mu);

	o += (size_t)snprintf(buf + o, sizeof buf - o, "[");
	for (i = 0; i < g_nthreads; i++) {
		bad += g_sl[i].bad_pages;
		for (j = 0; j < g_sl[i].nbad && shown < MAX_BAD; j++, shown++) {
			struct bad *b = &g_sl[i].bad[j];

			o += (size_t)snprintf(buf + o, sizeof buf - o,
					      "%s{\"page\":%llu,\"word\":%llu,\"found\":\"0x%016llx\","
					      "\"expected\":\"0x%016llx\"}", shown ? "," : "",
					      (unsigned long long)b->page, (unsigned long long)b->word,
					      (unsigned long long)b->found,
					      (unsigned long long)b->expected);
		}
	}
	o += (size_t)snprintf(buf + o, sizeof buf - o, "]");
	{
		char line[4600];
		int n = snprintf(line, sizeof line,
				 "{\"seq\":%llu,\"ok\":%s,\"pages\":%llu,\"bad_pages\":%llu,"
				 "\"first_bad\":%s,\"verify_ns\":%llu,\"t\":%.6f}\n",
				 (unsigned long long)g_seq, bad ? "false" : "true",
				 (unsigned long long)g_pages, (unsigned long long)bad, buf,
				 (unsigned long long)(now_ns() - t0), (double)now_ns() / 1e9);

		if (!g_result)
			fprintf(stderr, "l1work: verify requested but no --result given\n");
		else if (write_atomic(g_result, line, (size_t)n) < 0)
			fprintf(stderr, "l1work: cannot write result %s: %s\n", g_result,
				strerror(errno));
	}
	pthread_mutex_lock(&g_mu);
	g_resume_epoch = g_seq;
	pthread_cond_broadcast(&g_resume_cv);
	pthread_mutex_unlock(&g_mu);
}

static int cmd_run(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "mib", required_argument, 0, 'm' }, { "threads", required_argument, 0, 't' },
		{ "rate-mib-s", required_argument, 0, 'r' }, { "status", required_argument, 0, 's' },
		{ "result", required_argument, 0, 'R' }, { "pidfile", required_argument, 0, 'p' },
		{ "entropy", required_argument, 0, 'e' }, { "pattern", required_argument, 0, 'P' },
		{ "hot-pct", required_argument, 0, 'H' }, { "progress", required_argument, 0, 'g' },
		{ "readers", required_argument, 0, 'D' }, { "pin", no_argument, 0, 'I' },
		{ 0, 0, 0, 0 } };
	uint64_t i, per, extra, next;
	sigset_t set;
	int c, err;

	g_mib = 64;
	g_nthreads = 2;
	g_rate_total = 32;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'm': g_mib = parse_u64("--mib", optarg, 1, 1u << 20); break;
		case 't': g_nthreads = parse_u64("--threads", optarg, 1, 256); break;
		case 'r': g_rate_total = parse_pos_double("--rate-mib-s", optarg); break;
		case 's': g_status = optarg; break;
		case 'R': g_result = optarg; break;
		case 'p': g_pidfile = optarg; break;
		case 'e': g_entropy = parse_u64("--entropy", optarg, 0, WORDS); break;
		case 'H': g_hot_pct = parse_u64("--hot-pct", optarg, 1, 100); break;
		case 'D': g_nreaders = parse_u64("--readers", optarg, 0, 256); break;
		case 'I': g_pin = 1; break;
		case 'g':
			g_progress = fopen(optarg, "a");
			if (!g_progress)
				die(EXIT_USAGE, "--progress %s: %s", optarg, strerror(errno));
			break;
		case 'P':
			if (!strcmp(optarg, "seq"))
				g_pattern = PAT_SEQ;
			else if (!strcmp(optarg, "random"))
				g_pattern = PAT_RANDOM;
			else if (!strcmp(optarg, "hot"))
				g_pattern = PAT_HOT;
			else
				die(EXIT_USAGE, "--pattern %s: seq, random or hot", optarg);
			break;
		default: die_bad_option("run", argv);
		}
	}
	need_no_args("run", argc, argv);
	g_pages = g_mib * (1u << 20) / PAGE;
	if (g_nthreads > g_pages)
		die(EXIT_USAGE, "--threads %llu exceeds the %llu pages",
		    (unsigned long long)g_nthreads, (unsigned long long)g_pages);
	g_rate = g_rate_total * (1 << 20) / (double)g_nthreads;
	if (g_entropy)
		g_random_words = WORDS / g_entropy;

	/* signals are taken synchronously by main (sigtimedwait): workers never see them */
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigprocmask(SIG_BLOCK, &set, NULL);

	g_mem = mmap(NULL, g_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		     -1, 0);
	if (g_mem == MAP_FAILED)
		die(EXIT_FAIL, "mmap %llu MiB: %s", (unsigned long long)g_mib, strerror(errno));
	g_sl = calloc(g_nthreads, sizeof *g_sl);
	if (!g_sl)
		die(EXIT_FAIL, "out of memory");
	per = g_pages / g_nthreads;
	extra = g_pages % g_nthreads;
	pthread_barrier_init(&g_ready, NULL, (unsigned)g_nthreads + 1);
	for (i = 0, next = 0; i < g_nthreads; i++) {
		g_sl[i].id = (int)i;
		g_sl[i].first = next;
		g_sl[i].n = per + (i < extra); /* contiguous slices, remainder spread over the first */
		next += g_sl[i].n;
		setup_sweep(&g_sl[i]);
		err = pthread_create(&g_sl[i].th, NULL, worker, &g_sl[i]);
		if (err)
			die(EXIT_FAIL, "pthread_create: %s", strerror(err));
		pin_to(g_sl[i].th, i);
	}
	pthread_barrier_wait(&g_ready); /* whole region touched: only now are we "up" */
	g_readers = calloc(g_nreaders ? g_nreaders : 1, sizeof *g_readers);
	if (!g_readers)
		die(EXIT_FAIL, "out of memory");
	for (i = 0; i < g_nreaders; i++) { /* each starts at its own place in the region */
		err = pthread_create(&g_readers[i], NULL, reader,
				     (void *)(uintptr_t)(g_pages * i / g_nreaders));
		if (err)
			die(EXIT_FAIL, "pthread_create: %s", strerror(err));
		pin_to(g_readers[i], g_nthreads + i);
	}
	write_pidfile(g_pidfile);
	write_status("running");
	for (;;) {
		struct timespec ts = { 0, (long)STATUS_NS };
		siginfo_t si;
		int sig = sigtimedwait(&set, &si, &ts);

		if (sig == SIGUSR1) {
			struct timespec zero = { 0, 0 };
			sigset_t pend, u2;

			/* pending signals are taken lowest number first: a corrupt sent just before
			 * this verify must still be applied before it */
			sigemptyset(&u2);
			sigaddset(&u2, SIGUSR2);
			if (sigpending(&pend) == 0 && sigismember(&pend, SIGUSR2) &&
			    sigtimedwait(&u2, &si, &zero) == SIGUSR2)
				atomic_store(&g_corrupt_req, 1);
			do_verify();
		}
		else if (sig == SIGUSR2)
			atomic_store(&g_corrupt_req, 1);
		else if (sig == SIGTERM || sig == SIGINT)
			break;
		write_status("running");
		write_progress();
	}
	write_status("terminated");
	remove_pidfile(g_pidfile);
	return EXIT_OK;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: l1work run [--mib M] [--threads T] [--rate-mib-s R] [--status PATH]\n"
		"                  [--result PATH] [--pidfile PATH] [--entropy N]\n"
		"                  [--pattern seq|random|hot] [--hot-pct P] [--progress PATH]\n"
		"                  [--readers N] [--pin]\n"
		"       l1work verify --pidfile P --result F [--timeout S]\n"
		"       l1work corrupt --pidfile P\n");
}

int main(int argc, char **argv)
{
	static const struct subcmd cmds[] = {
		{"run", cmd_run},
		{"verify", ctl_verify},
		{"corrupt", ctl_corrupt},
		{NULL, NULL},
	};

	g_prog = "l1work";
	return dispatch(argc, argv, cmds, usage);
}
