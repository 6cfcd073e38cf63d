/* nvmm: a tiny KVM-based VMM that runs the real-mode L2 payloads inside L1 (see guests/README.md). */
#define _GNU_SOURCE
#include "../common/nvctl.h"
#include "payloads/mailbox.h"

#include <cpuid.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>

#define VERIFY_WAIT_NS (50 * 1000 * 1000ull) /* how long a verify waits for a clean report exit */
#define STATUS_MIN_NS  (50 * 1000 * 1000ull) /* status file rate limit */
#define HOLD_MEM       (1u << 20)

/* Flags set by signal handlers; all real work happens in the VMM thread between KVM_RUN calls. */
static volatile sig_atomic_t g_verify_req, g_corrupt_req, g_stop_req, g_alarm, g_pause_req,
	g_resume_req;
static struct kvm_run *volatile g_run;

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		g_verify_req = 1;
	else if (sig == SIGUSR2)
		g_corrupt_req = 1;
	else if (sig == SIGALRM)
		g_alarm = 1;
	else if (sig == SIGTSTP)
		g_pause_req = 1;
	else if (sig == SIGCONT)
		g_resume_req = 1;
	else
		g_stop_req = 1;
	/* makes a KVM_RUN that has not entered the guest yet return EINTR at once (no lost wakeup) */
	if (g_run)
		g_run->immediate_exit = 1;
}

static void install_handlers(void)
{
	static const int sigs[] = { SIGUSR1, SIGUSR2, SIGTERM, SIGINT, SIGALRM, SIGTSTP, SIGCONT };
	struct sigaction sa;
	size_t i;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART: the pending signal must interrupt KVM_RUN */
	for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
		sigaction(sigs[i], &sa, NULL);
}

static void arm_alarm(uint64_t ns)
{
	struct itimerval it;

	memset(&it, 0, sizeof it);
	it.it_value.tv_sec = (time_t)(ns / 1000000000ull);
	it.it_value.tv_usec = (suseconds_t)(ns % 1000000000ull / 1000);
	setitimer(ITIMER_REAL, &it, NULL); /* ns == 0 disarms */
}

/* ------------------------------------------------------------------ KVM plumbing */

struct vm {
	int kvm, vm, vcpu;
	uint8_t *mem;
	size_t mem_size;
	struct kvm_run *run;
};

static int open_kvm(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC), v;

	if (fd < 0)
		die(EXIT_FAIL, "cannot open /dev/kvm: %s", strerror(errno));
	v = ioctl(fd, KVM_GET_API_VERSION, 0);
	if (v != KVM_API_VERSION)
		die(EXIT_FAIL, "KVM_GET_API_VERSION returned %d, need %d", v, KVM_API_VERSION);
	return fd;
}

static void vm_create(struct vm *v, size_t mem_size)
{
	struct kvm_userspace_memory_region reg;
	int sz;

	memset(v, 0, sizeof *v);
	v->kvm = open_kvm();
	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		die(EXIT_FAIL, "KVM_CREATE_VM: %s", strerror(errno));
	/* VMX without unrestricted guest emulates real mode via vm86 and needs a TSS; SVM ignores it */
	ioctl(v->vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);
	v->mem_size = mem_size;
	v->mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (v->mem == MAP_FAILED)
		die(EXIT_FAIL, "mmap guest memory (%zu bytes): %s", mem_size, strerror(errno));
	memset(&reg, 0, sizeof reg);
	reg.slot = 0;
	reg.guest_phys_addr = 0;
	reg.memory_size = mem_size;
	reg.userspace_addr = (uintptr_t)v->mem;
	if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &reg) < 0)
		die(EXIT_FAIL, "KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		die(EXIT_FAIL, "KVM_CREATE_VCPU: %s", strerror(errno));
	sz = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (sz < (int)sizeof(struct kvm_run))
		die(EXIT_FAIL, "KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
	v->run = mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die(EXIT_FAIL, "mmap kvm_run: %s", strerror(errno));
}

/* Flat 16-bit real mode, cs:ip = 0:PAYLOAD_GPA. */
static void vcpu_reset_realmode(struct vm *v)
{
	struct kvm_sregs s;
	struct kvm_regs r;

	if (ioctl(v->vcpu, KVM_GET_SREGS, &s) < 0)
		die(EXIT_FAIL, "KVM_GET_SREGS: %s", strerror(errno));
	/* reset state has cs = f000 with base ffff0000; every segment becomes base 0, selector 0 */
	s.cs.base = 0;
	s.cs.selector = 0;
	s.ds = s.es = s.fs = s.gs = s.ss = s.cs;
	s.ds.type = s.es.type = s.fs.type = s.gs.type = s.ss.type = 3; /* data r/w, accessed */
	if (ioctl(v->vcpu, KVM_SET_SREGS, &s) < 0)
		die(EXIT_FAIL, "KVM_SET_SREGS: %s", strerror(errno));
	memset(&r, 0, sizeof r);
	r.rip = PAYLOAD_GPA;
	r.rsp = STACK_TOP;
	r.rflags = 0x2; /* bit 1 is reserved-one; IF clear */
	if (ioctl(v->vcpu, KVM_SET_REGS, &r) < 0)
		die(EXIT_FAIL, "KVM_SET_REGS: %s", strerror(errno));
}

static const char *exit_name(uint32_t r)
{
	static const char *const n[] = {
		"UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO",
		"IRQ_WINDOW_OPEN", "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS",
		"S390_SIEIC", "S390_RESET", "DCR", "NMI", "INTERNAL_ERROR", "OSI", "PAPR_HCALL",
		"S390_UCONTROL", "WATCHDOG", "S390_TSCH", "EPR", "SYSTEM_EVENT", "S390_STSI",
		"IOAPIC_EOI", "HYPERV", "ARM_NISV", "X86_RDMSR", "X86_WRMSR", "DIRTY_RING_FULL",
		"AP_RESET_HOLD", "X86_BUS_LOCK", "XEN", "RISCV_SBI", "RISCV_CSR", "NOTIFY" };

	return r < sizeof n / sizeof n[0] ? n[r] : "?";
}

/* Registers for the one-line diagnostic; empty when they cannot be read. */
static void regs_str(struct vm *v, char *buf, size_t cap)
{
	struct kvm_regs r;
	struct kvm_sregs s;

	buf[0] = 0;
	if (ioctl(v->vcpu, KVM_GET_REGS, &r) < 0 || ioctl(v->vcpu, KVM_GET_SREGS, &s) < 0)
		return;
	snprintf(buf, cap, "rip=0x%llx rsp=0x%llx rax=0x%llx rbx=0x%llx rcx=0x%llx rdx=0x%llx "
		 "rsi=0x%llx rdi=0x%llx rbp=0x%llx rflags=0x%llx cs=0x%x ds=0x%x es=0x%x ss=0x%x "
		 "cr0=0x%llx",
		 r.rip, r.rsp, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rflags,
		 s.cs.selector, s.ds.selector, s.es.selector, s.ss.selector, s.cr0);
}

/* ------------------------------------------------------------------ JSON helpers */

static void json_str(char *out, size_t cap, const char *s)
{
	size_t o = 0;

	if (cap < 3)
		return;
	out[o++] = '"';
	for (; *s && o + 8 < cap; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			o += (size_t)snprintf(out + o, cap - o, "\\%c", c);
		else if (c < 0x20)
			o += (size_t)snprintf(out + o, cap - o, "\\u%04x", c);
		else
			out[o++] = (char)c;
	}
	out[o++] = '"';
	out[o] = 0;
}

static const char *kind_name(uint32_t k)
{
	switch (k) {
	case 0: return "unknown";
	case KIND_PAGECOUNT: return "pagecount";
	case KIND_CPUID: return "cpuid";
	case KIND_VMMCALL: return "vmmcall";
	case KIND_VMCALL: return "vmcall";
	case KIND_PIO: return "pio";
	case KIND_SPIN: return "spin";
	default: return "other";
	}
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

struct rep {
	uint32_t pass, iters, kind;
	uint64_t cycles, wall_ns;
};

static void print_rep(const struct rep *r)
{
	printf("{\"kind\":\"%s\",\"pass\":%u,\"cycles\":%llu,\"iters\":%u,\"cycles_per_exit\":%.1f,"
	       "\"wall_ns\":%llu}\n", kind_name(r->kind), r->pass, (unsigned long long)r->cycles,
	       r->iters, r->iters ? (double)r->cycles / r->iters : 0.0,
	       (unsigned long long)r->wall_ns);
}

/* ------------------------------------------------------------------ nvmm run */

struct run_opts {
	const char *payload, *status, *log, *result, *pidfile;
	uint64_t mem_kib, pages, iters, reports;
};

struct run_state {
	struct run_opts o;
	struct vm v;
	volatile uint32_t *mb32; /* mailbox, as u32 words (guest writes it, so volatile) */
	char payload_json[512];
	int log_fd;
	uint64_t t_last_rep, t_last_status, wall_last;
	uint64_t n_reports, exits_io, exits_pio, exits_intr, verify_seq;
	uint32_t last_iters;
	uint64_t last_cycles;
	int corrupted, verify_pending;
	uint64_t verify_deadline;
	struct rep *reps;
};

#define MB32(st, off) ((st)->mb32[((off) - MB_BASE) / 4])

static uint32_t mb_kind(struct run_state *st)
{
	return MB32(st, MB_KIND);
}

static void write_status_full(struct run_state *st, const char *state, const char *err,
			      const char *regs, int force)
{
	char buf[2048], e[1200] = "";
	uint64_t t = now_ns();
	int n;

	if (!st->o.status || (!force && t - st->t_last_status < STATUS_MIN_NS))
		return;
	st->t_last_status = t;
	if (err) {
		char q[512];

		json_str(q, sizeof q, err);
		snprintf(e, sizeof e, ",\"error\":%s", q);
	} else if (regs && *regs) {
		char q[512];

		json_str(q, sizeof q, regs);
		snprintf(e, sizeof e, ",\"regs\":%s", q);
	}
	n = snprintf(buf, sizeof buf,
		     "{\"payload\":%s,\"kind\":\"%s\",\"state\":\"%s\",\"pid\":%d,\"pass\":%u,"
		     "\"reports\":%llu,\"exits_io\":%llu,\"exits_pio\":%llu,\"exits_intr\":%llu,"
		     "\"last_cycles\":%llu,\"last_iters\":%u,\"t\":%.6f,\"wall_ns_last\":%llu,"
		     "\"verifies\":%llu,\"corrupted\":%s%s}\n",
		     st->payload_json, kind_name(mb_kind(st)), state, (int)getpid(),
		     MB32(st, MB_PASS), (unsigned long long)st->n_reports,
		     (unsigned long long)st->exits_io, (unsigned long long)st->exits_pio,
		     (unsigned long long)st->exits_intr, (unsigned long long)st->last_cycles,
		     st->last_iters, (double)t / 1e9, (unsigned long long)st->wall_last,
		     (unsigned long long)st->verify_seq, st->corrupted ? "true" : "false", e);
	if (write_atomic(st->o.status, buf, (size_t)n) < 0)
		fprintf(stderr, "nvmm: cannot write status %s: %s\n", st->o.status, strerror(errno));
}

static void write_status(struct run_state *st, const char *state, const char *err, int force)
{
	write_status_full(st, state, err, NULL, force);
}

static void write_status_regs(struct run_state *st, const char *state, const char *regs)
{
	write_status_full(st, state, NULL, regs, 1);
}

/* Final status, the buffered report lines, then exit. */
__attribute__((noreturn))
static void finish(struct run_state *st, const char *state, const char *err, int code)
{
	char regs[512], e2[1024];
	uint64_t i;

	if (!err && strcmp(state, "done")) {
		/* where the guest stopped helps debug a payload that never reported */
		regs_str(&st->v, regs, sizeof regs);
		snprintf(e2, sizeof e2, "%s", regs);
		write_status_regs(st, state, e2);
	} else {
		write_status(st, state, err, 1);
	}
	if (st->reps) {
		for (i = 0; i < st->n_reports && i < st->o.reports; i++)
			print_rep(&st->reps[i]);
		fflush(stdout);
	}
	if (err)
		fprintf(stderr, "nvmm: %s\n", err);
	remove_pidfile(st->o.pidfile);
	exit(code);
}

__attribute__((noreturn))
static void fail_exit(struct run_state *st, const char *what)
{
	char regs[512], msg[1024];

	regs_str(&st->v, regs, sizeof regs);
	snprintf(msg, sizeof msg, "%s %s", what, regs);
	finish(st, "error", msg, EXIT_FAIL);
}

/*
 * Check the pagecount region.  At a report exit every page must hold (pass & 0xff).  When the
 * vCPU was stopped mid-pass, pages [0,k) already hold pass+1 and [k,n) pass: k is chosen as the
 * single edge that explains the most pages, so only pages that fit no edge count as bad.
 */
static void do_verify(struct run_state *st, int at_report, const char *error)
{
	char fb[1024], line[2048], q[300] = "";
	size_t o = 0;
	uint32_t n = (uint32_t)st->o.pages, pass = MB32(st, MB_PASS), i, k = 0, bad = 0;
	uint8_t v = (uint8_t)pass, w = (uint8_t)(pass + 1);
	const uint8_t *reg = st->v.mem + REGION_GPA;
	int m;

	st->verify_seq++;
	fb[0] = 0;
	if (!error && !at_report) {
		uint64_t cost = 0, best;

		for (i = 0; i < n; i++)
			cost += reg[(size_t)i * 4096] != v;
		best = cost;
		for (i = 1; i <= n; i++) {
			uint8_t b = reg[(size_t)(i - 1) * 4096];

			cost = cost + (b != w) - (b != v);
			if (cost < best) {
				best = cost;
				k = i;
			}
		}
	}
	for (i = 0; !error && i < n; i++) {
		const uint8_t *p = reg + (size_t)i * 4096;
		uint8_t want = i < k ? w : v;
		const char *field = NULL;
		uint32_t idx, exp = 0, found = 0;

		memcpy(&idx, p + 4, 4);
		if (p[0] != want) {
			field = "count";
			exp = want;
			found = p[0];
		} else if (idx != i && !(pass == 0 && i >= k && idx == 0)) {
			/* on pass 0 pages not yet reached still hold 0 in their index word */
			field = "index";
			exp = i;
			found = idx;
		}
		if (!field)
			continue;
		if (bad < 8)
			o += (size_t)snprintf(fb + o, sizeof fb - o,
					      "%s{\"page\":%u,\"field\":\"%s\",\"expected\":%u,\"found\":%u}",
					      bad ? "," : "", i, field, exp, found);
		bad++;
	}
	if (error) {
		char e[256];

		json_str(e, sizeof e, error);
		snprintf(q, sizeof q, ",\"error\":%s", e);
	}
	m = snprintf(line, sizeof line,
		     "{\"seq\":%llu,\"ok\":%s,\"pass\":%u,\"pages\":%u,\"bad\":%u,"
		     "\"first_bad\":[%s],\"edge\":%u,\"at\":\"%s\",\"t\":%.6f%s}\n",
		     (unsigned long long)st->verify_seq, (!error && !bad) ? "true" : "false", pass, n,
		     bad, fb, k, at_report ? "report" : "stop", (double)now_ns() / 1e9, q);
	if (!st->o.result)
		fprintf(stderr, "nvmm: verify requested but no --result given\n");
	else if (write_atomic(st->o.result, line, (size_t)m) < 0)
		fprintf(stderr, "nvmm: cannot write result %s: %s\n", st->o.result, strerror(errno));
	st->verify_pending = 0;
	arm_alarm(0);
}

/*
 * `nvmm pause` (SIGTSTP): stay out of KVM_RUN until SIGCONT, so L1's vCPU runs only L1 (it is
 * never in guest mode) and L1 can be stopped and migrated under an accel without nested state.
 * Verify and corrupt requests wait for the resume; SIGTERM still ends the run.
 */
static void pause_here(struct run_state *st)
{
	sigset_t ours, old;

	sigemptyset(&ours);
	sigaddset(&ours, SIGCONT);
	sigaddset(&ours, SIGTERM);
	sigaddset(&ours, SIGINT);
	/* blocked while the flags are read, so a resume landing between check and wait is kept */
	sigprocmask(SIG_BLOCK, &ours, &old);
	g_pause_req = 0;
	g_resume_req = 0;
	arm_alarm(0);
	write_status(st, "paused", NULL, 1);
	while (!g_resume_req && !g_stop_req)
		sigsuspend(&old);
	sigprocmask(SIG_SETMASK, &old, NULL);
	g_resume_req = 0;
	if (g_stop_req)
		finish(st, "terminated", NULL, EXIT_OK);
	if (st->verify_pending) /* the window ran out while paused: answer at the next stop */
		st->verify_deadline = now_ns();
	write_status(st, "running", NULL, 1);
}

/* Runs whenever KVM_RUN has returned, i.e. while L2 is stopped. */
static void service(struct run_state *st, int at_report)
{
	uint64_t t;

	if (g_stop_req)
		finish(st, "terminated", NULL, EXIT_OK);
	if (g_pause_req)
		pause_here(st);
	if (g_corrupt_req) {
		g_corrupt_req = 0;
		st->v.mem[REGION_GPA + 3 * 4096] += 0x55; /* byte 0 of page 3 */
		st->corrupted = 1;
		write_status(st, "running", NULL, 1);
	}
	if (g_verify_req && !st->verify_pending) {
		g_verify_req = 0;
		st->verify_pending = 1;
		st->verify_deadline = now_ns() + VERIFY_WAIT_NS;
		g_alarm = 0;
		arm_alarm(VERIFY_WAIT_NS); /* guarantees a stop by the deadline even without reports */
	}
	if (!st->verify_pending)
		return;
	t = now_ns();
	if (mb_kind(st) == KIND_PAGECOUNT) {
		if (at_report || g_alarm || t >= st->verify_deadline)
			do_verify(st, at_report, NULL);
	} else if (mb_kind(st) != 0) {
		do_verify(st, 0, "payload has no verifiable memory region (not pagecount)");
	} else if (g_alarm || t >= st->verify_deadline) {
		do_verify(st, 0, "payload has not set its kind in the mailbox yet");
	}
	if (st->verify_pending && g_alarm) {
		/* a spurious early alarm: re-arm for the rest of the window */
		g_alarm = 0;
		arm_alarm(st->verify_deadline > t ? st->verify_deadline - t : 1000);
	}
}

static void on_report(struct run_state *st)
{
	uint64_t t = now_ns();
	struct rep r;

	r.pass = MB32(st, MB_PASS);
	r.kind = mb_kind(st);
	r.iters = MB32(st, MB_ITERS_DONE);
	r.cycles = (uint64_t)MB32(st, MB_CYCLES) | (uint64_t)MB32(st, MB_CYCLES + 4) << 32;
	r.wall_ns = t - st->t_last_rep;
	st->t_last_rep = t;
	st->last_iters = r.iters;
	st->last_cycles = r.cycles;
	st->wall_last = r.wall_ns;
	if (st->reps && st->n_reports < st->o.reports)
		st->reps[st->n_reports] = r;
	st->n_reports++;
	if (st->o.reports && st->n_reports >= st->o.reports) {
		service(st, 1); /* a verify that arrived with this very report is still answered */
		finish(st, "done", NULL, EXIT_OK);
	}
	write_status(st, "running", NULL, st->n_reports == 1);
}

/* The payload's exception stub reported a CPU exception: name it and where it happened. */
__attribute__((noreturn))
static void fault_exit(struct run_state *st, uint8_t vec)
{
	static const char *const names[] = {
		"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
		"#SS", "#GP", "#PF", "res15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP" };
	struct kvm_regs r;
	struct kvm_sregs s;
	char m[200];
	uint16_t ip = 0, cs = 0;

	if (ioctl(st->v.vcpu, KVM_GET_REGS, &r) == 0 && ioctl(st->v.vcpu, KVM_GET_SREGS, &s) == 0) {
		/* the stub popped the vector, so ss:sp points at the interrupt frame (ip, cs, flags) */
		uint64_t a = s.ss.base + (r.rsp & 0xffff);

		if (a + 4 <= st->v.mem_size) {
			memcpy(&ip, st->v.mem + a, 2);
			memcpy(&cs, st->v.mem + a + 2, 2);
		}
	}
	snprintf(m, sizeof m, "guest exception vector %u (%s) at %04x:%04x", vec,
		 vec < sizeof names / sizeof names[0] ? names[vec] : "?", cs, ip);
	fail_exit(st, m);
}

static void handle_io(struct run_state *st)
{
	struct kvm_run *run = st->v.run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	size_t len = (size_t)run->io.size * run->io.count;
	char what[160];

	st->exits_io++;
	if (run->io.direction == KVM_EXIT_IO_OUT) {
		switch (run->io.port) {
		case PORT_REPORT:
			on_report(st);
			service(st, 1);
			return;
		case PORT_NOP:
			st->exits_pio++;
			service(st, 0);
			return;
		case PORT_FAULT:
			fault_exit(st, data[0]);
		case PORT_CONSOLE:
			if (st->log_fd >= 0 && write(st->log_fd, data, len) < 0)
				fprintf(stderr, "nvmm: log write: %s\n", strerror(errno));
			service(st, 0);
			return;
		}
	}
	snprintf(what, sizeof what, "unexpected exit IO (reason 2) port=0x%x dir=%s size=%u count=%u",
		 run->io.port, run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in", run->io.size,
		 run->io.count);
	fail_exit(st, what);
}

static int cmd_run(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "payload", required_argument, 0, 'P' }, { "mem-kib", required_argument, 0, 'm' },
		{ "pages", required_argument, 0, 'n' }, { "iters", required_argument, 0, 'i' },
		{ "reports", required_argument, 0, 'r' }, { "status", required_argument, 0, 's' },
		{ "log", required_argument, 0, 'l' }, { "result", required_argument, 0, 'R' },
		{ "pidfile", required_argument, 0, 'p' }, { 0, 0, 0, 0 } };
	static struct run_state st;
	struct run_opts *o = &st.o;
	struct stat sb;
	const char *base;
	ssize_t got;
	int c, fd;

	o->mem_kib = 1024;
	o->pages = 128;
	o->iters = 20000;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'P': o->payload = optarg; break;
		case 'm': o->mem_kib = parse_u64("--mem-kib", optarg, 128, 4u << 20); break;
		case 'n': o->pages = parse_u64("--pages", optarg, 0, REGION_MAX_PAGES); break;
		case 'i': o->iters = parse_u64("--iters", optarg, 0, UINT32_MAX); break;
		case 'r': o->reports = parse_u64("--reports", optarg, 0, 10000000); break;
		case 's': o->status = optarg; break;
		case 'l': o->log = optarg; break;
		case 'R': o->result = optarg; break;
		case 'p': o->pidfile = optarg; break;
		default: die_bad_option("run", argv);
		}
	}
	need_no_args("run", argc, argv);
	if (!o->payload)
		die(EXIT_USAGE, "run: --payload is required");
	if (o->mem_kib % 4)
		die(EXIT_USAGE, "--mem-kib must be a multiple of 4");
	if (REGION_GPA + o->pages * 4096 > o->mem_kib * 1024)
		die(EXIT_USAGE, "--pages %llu does not fit in --mem-kib %llu",
		    (unsigned long long)o->pages, (unsigned long long)o->mem_kib);

	fd = open(o->payload, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &sb) < 0)
		die(EXIT_USAGE, "cannot open payload %s: %s", o->payload, strerror(errno));
	if (sb.st_size <= 0 || sb.st_size > PAYLOAD_MAX)
		die(EXIT_USAGE, "payload %s: size %lld not in 1..%d", o->payload,
		    (long long)sb.st_size, PAYLOAD_MAX);

	install_handlers();
	vm_create(&st.v, o->mem_kib * 1024);
	got = read(fd, st.v.mem + PAYLOAD_GPA, (size_t)sb.st_size);
	if (got != sb.st_size)
		die(EXIT_FAIL, "short read of payload %s", o->payload);
	close(fd);
	base = strrchr(o->payload, '/');
	json_str(st.payload_json, sizeof st.payload_json, base ? base + 1 : o->payload);

	st.mb32 = (volatile uint32_t *)(st.v.mem + MB_BASE);
	MB32(&st, MB_PAGES) = (uint32_t)o->pages;
	MB32(&st, MB_ITERS) = (uint32_t)o->iters;
	MB32(&st, MB_MAGIC) = MB_MAGIC_VALUE;
	vcpu_reset_realmode(&st.v);

	st.log_fd = -1;
	if (o->log) {
		st.log_fd = open(o->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (st.log_fd < 0)
			die(EXIT_FAIL, "cannot open log %s: %s", o->log, strerror(errno));
	}
	if (o->reports) {
		st.reps = calloc(o->reports, sizeof *st.reps);
		if (!st.reps)
			die(EXIT_FAIL, "out of memory for %llu reports", (unsigned long long)o->reports);
	}
	write_pidfile(o->pidfile);
	st.t_last_rep = now_ns();
	write_status(&st, "starting", NULL, 1);
	g_run = st.v.run;

	for (;;) {
		int r;

		service(&st, 0); /* signals that arrived while we were outside KVM_RUN */
		r = ioctl(st.v.vcpu, KVM_RUN, 0);
		/* cleared before the flags are read, so a signal landing now is never lost */
		st.v.run->immediate_exit = 0;
		if (r < 0) {
			char m[200];

			if (errno == EINTR || errno == EAGAIN) {
				st.exits_intr++;
				continue;
			}
			snprintf(m, sizeof m, "KVM_RUN failed: %s", strerror(errno));
			fail_exit(&st, m);
		}
		switch (st.v.run->exit_reason) {
		case KVM_EXIT_IO:
			handle_io(&st);
			break;
		case KVM_EXIT_HLT:
			finish(&st, "halted", NULL, EXIT_OK);
		case KVM_EXIT_INTR:
			st.exits_intr++;
			break;
		default: {
			char m[300];
			uint32_t er = st.v.run->exit_reason;
			int k = snprintf(m, sizeof m, "unexpected exit %s (reason %u)", exit_name(er), er);

			if (er == KVM_EXIT_FAIL_ENTRY)
				snprintf(m + k, sizeof m - (size_t)k, " hw_reason=0x%llx",
					 (unsigned long long)st.v.run->fail_entry.hardware_entry_failure_reason);
			else if (er == KVM_EXIT_INTERNAL_ERROR)
				snprintf(m + k, sizeof m - (size_t)k, " suberror=%u",
					 st.v.run->internal.suberror);
			else if (er == KVM_EXIT_MMIO)
				snprintf(m + k, sizeof m - (size_t)k, " gpa=0x%llx len=%u %s",
					 (unsigned long long)st.v.run->mmio.phys_addr, st.v.run->mmio.len,
					 st.v.run->mmio.is_write ? "write" : "read");
			fail_exit(&st, m);
		}
		}
	}
}

/* ------------------------------------------------------------------ pause, resume */

/* `nvmm pause --pidfile P --status S [--timeout T]`: ask `run` to leave KVM_RUN and wait until
 * its status says so (state "paused", its own pid); print that status line. */
static int ctl_pause(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "pidfile", required_argument, 0, 'p' }, { "status", required_argument, 0, 's' },
		{ "timeout", required_argument, 0, 't' }, { 0, 0, 0, 0 } };
	const char *pidfile = NULL, *status = NULL;
	double timeout = 10;
	static char line[4096];
	char want[64];
	uint64_t deadline;
	pid_t pid;
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == 'p')
			pidfile = optarg;
		else if (c == 's')
			status = optarg;
		else if (c == 't')
			timeout = parse_pos_double("--timeout", optarg);
		else
			die_bad_option("pause", argv);
	}
	need_no_args("pause", argc, argv);
	if (!status)
		die(EXIT_USAGE, "pause: --status is required");
	pid = ctl_target(pidfile);
	if (kill(pid, SIGTSTP) < 0)
		die(EXIT_NOTARGET, "cannot signal pid %d: %s", (int)pid, strerror(errno));
	snprintf(want, sizeof want, "\"pid\":%d,", (int)pid);
	deadline = now_ns() + (uint64_t)(timeout * 1e9);
	for (;;) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };

		if (read_small(status, line, sizeof line) > 0 && strstr(line, "\"state\":\"paused\"") &&
		    strstr(line, want)) {
			size_t n = strlen(line);

			while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
				line[--n] = 0;
			printf("%s\n", line);
			return EXIT_OK;
		}
		if (kill(pid, 0) < 0 && errno == ESRCH)
			die(EXIT_NOTARGET, "pid %d exited before pausing", (int)pid);
		if (now_ns() >= deadline)
			die(EXIT_TIMEOUT, "pause timed out after %gs: %s does not say paused", timeout,
			    status);
		nanosleep(&ts, NULL);
	}
}

/* `nvmm resume --pidfile P`: a paused `run` enters KVM_RUN again (it does not wait). */
static int ctl_resume(int argc, char **argv)
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
			die_bad_option("resume", argv);
	}
	need_no_args("resume", argc, argv);
	pid = ctl_target(pidfile);
	if (kill(pid, SIGCONT) < 0)
		die(EXIT_NOTARGET, "cannot signal pid %d: %s", (int)pid, strerror(errno));
	return EXIT_OK;
}

/* ------------------------------------------------------------------ hold, l1loop, caps */

static int cmd_hold(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "pidfile", required_argument, 0, 'p' }, { "status", required_argument, 0, 's' },
		{ 0, 0, 0, 0 } };
	const char *pidfile = NULL, *status = NULL;
	struct vm v;
	sigset_t set;
	char buf[128];
	int c, n, sig;

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == 'p')
			pidfile = optarg;
		else if (c == 's')
			status = optarg;
		else
			die_bad_option("hold", argv);
	}
	need_no_args("hold", argc, argv);
	/* wait synchronously for the stop signals; USR1/USR2 must not kill a holder */
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigprocmask(SIG_BLOCK, &set, NULL);
	signal(SIGUSR1, SIG_IGN);
	signal(SIGUSR2, SIG_IGN);
	vm_create(&v, HOLD_MEM); /* VM + memory + vCPU, but never KVM_RUN */
	write_pidfile(pidfile);
	n = snprintf(buf, sizeof buf, "{\"state\":\"holding\",\"pid\":%d,\"t\":%.6f}\n",
		     (int)getpid(), (double)now_ns() / 1e9);
	if (status && write_atomic(status, buf, (size_t)n) < 0)
		die(EXIT_FAIL, "cannot write status %s: %s", status, strerror(errno));
	while (sigwait(&set, &sig) != 0)
		;
	n = snprintf(buf, sizeof buf, "{\"state\":\"released\",\"pid\":%d,\"t\":%.6f}\n",
		     (int)getpid(), (double)now_ns() / 1e9);
	if (status)
		write_atomic(status, buf, (size_t)n);
	remove_pidfile(pidfile);
	return EXIT_OK;
}

/* Single-level baseline: the cpuidloop payload's timing loop, in L1 userspace. */
static int cmd_l1loop(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "kind", required_argument, 0, 'k' }, { "iters", required_argument, 0, 'i' },
		{ "reports", required_argument, 0, 'r' }, { 0, 0, 0, 0 } };
	uint64_t iters = 20000, reports = 0, n = 0, t_last;
	const char *kind = "cpuid";
	int c;

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == 'k')
			kind = optarg;
		else if (c == 'i')
			iters = parse_u64("--iters", optarg, 0, UINT32_MAX);
		else if (c == 'r')
			reports = parse_u64("--reports", optarg, 0, 10000000);
		else
			die_bad_option("l1loop", argv);
	}
	need_no_args("l1loop", argc, argv);
	if (strcmp(kind, "cpuid"))
		die(EXIT_USAGE, "l1loop: --kind must be cpuid, got '%s'", kind);
	t_last = now_ns();
	while (!reports || n < reports) {
		struct rep r;
		uint64_t t0 = rdtsc(), t, i;

		for (i = 0; i < iters; i++) {
			uint32_t a = 0, b, cc = 0, d;

			__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(cc), "=d"(d));
		}
		r.cycles = rdtsc() - t0;
		t = now_ns();
		r.pass = (uint32_t)++n;
		r.iters = (uint32_t)iters;
		r.kind = KIND_CPUID;
		r.wall_ns = t - t_last;
		t_last = t;
		print_rep(&r);
		fflush(stdout);
	}
	return EXIT_OK;
}

static int cmd_caps(int argc, char **argv)
{
	static const struct { int cap; const char *name; } caps[] = {
		{ 157, "NESTED_STATE" }, { 163, "HYPERV_ENLIGHTENED_VMCS" },
		{ 164, "EXCEPTION_PAYLOAD" }, { 167, "HYPERV_CPUID" } };
	unsigned int a, b, cc, d, maxext;
	char vendor[13] = "";
	int fd, api, svm = 0, vmx = 0, hv = 0;
	size_t i;

	(void)argv;
	if (argc > 1)
		die(EXIT_USAGE, "caps takes no arguments");
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(EXIT_FAIL, "cannot open /dev/kvm: %s", strerror(errno));
	api = ioctl(fd, KVM_GET_API_VERSION, 0);
	/* the vendor tells the harness which vmcallloop variant this L1 can run natively */
	if (__get_cpuid(0, &a, &b, &cc, &d)) {
		memcpy(vendor, &b, 4);
		memcpy(vendor + 4, &d, 4);
		memcpy(vendor + 8, &cc, 4);
	}
	if (__get_cpuid(1, &a, &b, &cc, &d)) {
		vmx = !!(cc & (1u << 5));
		hv = !!(cc & (1u << 31));
	}
	maxext = __get_cpuid_max(0x80000000, NULL);
	if (maxext >= 0x80000001 && __get_cpuid(0x80000001, &a, &b, &cc, &d))
		svm = !!(cc & (1u << 2));
	printf("{\"api_version\":%d,\"caps\":{", api);
	for (i = 0; i < sizeof caps / sizeof caps[0]; i++)
		printf("%s\"%d\":%d", i ? "," : "", caps[i].cap,
		       ioctl(fd, KVM_CHECK_EXTENSION, caps[i].cap));
	printf("},\"names\":{");
	for (i = 0; i < sizeof caps / sizeof caps[0]; i++)
		printf("%s\"%d\":\"%s\"", i ? "," : "", caps[i].cap, caps[i].name);
	printf("},\"cpu_vendor\":\"%s\",\"vmx\":%s,\"svm\":%s,\"hypervisor\":%s}\n", vendor,
	       vmx ? "true" : "false", svm ? "true" : "false", hv ? "true" : "false");
	if (api != KVM_API_VERSION)
		die(EXIT_FAIL, "KVM_GET_API_VERSION returned %d, need %d", api, KVM_API_VERSION);
	return EXIT_OK;
}

/*
 * Raw CPUID of the leaves harness/hvcpuid.py decodes (its DUMP_LEAVES, subleaf 0), in its line
 * format.  No max-leaf check on purpose: the decoder needs the raw answers and ignores leaves
 * above 0x40000000.EAX itself.  "# end" lets the harness tell a complete dump from a cut one.
 */
static int cmd_cpuid_dump(int argc, char **argv)
{
	static const uint32_t leaves[] = {
		0x00000001, 0x40000000, 0x40000001, 0x40000002, 0x40000003, 0x40000004,
		0x40000005, 0x40000006, 0x40000007, 0x40000008, 0x40000009, 0x4000000a,
		0x40000100, 0x40000101, 0x80000001 };
	unsigned int a, b, c, d;
	size_t i;

	(void)argv;
	if (argc > 1)
		die(EXIT_USAGE, "cpuid-dump takes no arguments");
	printf("# nvmm cpuid-dump: leaf subleaf: registers\n");
	for (i = 0; i < sizeof leaves / sizeof leaves[0]; i++) {
		__cpuid_count(leaves[i], 0, a, b, c, d);
		printf("0x%08x 0x%08x: eax=0x%08x ebx=0x%08x ecx=0x%08x edx=0x%08x\n",
		       leaves[i], 0u, a, b, c, d);
	}
	printf("# end\n");
	return fflush(stdout) == 0 ? EXIT_OK : EXIT_FAIL;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: nvmm run --payload FILE [--mem-kib N] [--pages N] [--iters N] [--reports K]\n"
		"                [--status PATH] [--log PATH] [--result PATH] [--pidfile PATH]\n"
		"       nvmm verify --pidfile P --result F [--timeout S]\n"
		"       nvmm corrupt --pidfile P\n"
		"       nvmm pause --pidfile P --status S [--timeout T]\n"
		"       nvmm resume --pidfile P\n"
		"       nvmm hold [--pidfile P] [--status PATH]\n"
		"       nvmm l1loop --kind cpuid [--iters N] [--reports K]\n"
		"       nvmm caps\n"
		"       nvmm cpuid-dump\n");
}

int main(int argc, char **argv)
{
	static const struct subcmd cmds[] = {
		{"run", cmd_run},
		{"verify", ctl_verify},
		{"corrupt", ctl_corrupt},
		{"pause", ctl_pause},
		{"resume", ctl_resume},
		{"hold", cmd_hold},
		{"l1loop", cmd_l1loop},
		{"caps", cmd_caps},
		{"cpuid-dump", cmd_cpuid_dump},
		{NULL, NULL},
	};

	g_prog = "nvmm";
	return dispatch(argc, argv, cmds, usage);
}
