/*
 * libhsmagent-fault: a PKCS#11 module that forwards every call to a real
 * module (SoftHSM by default) and can add latency, return errors, hang and
 * pretend the token was removed, so that tests and `hsmagent bench --module`
 * can treat SoftHSM like a network HSM. README.md beside this file describes
 * the controls; in short:
 *
 *   HSMAGENT_FAULT_MODULE   the real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   HSMAGENT_FAULT_CONTROL  key=value control file, checked (stat) on every wrapped call
 *   HSMAGENT_FAULT_STATS    binary counter file shared by every process using it
 *   HSMAGENT_FAULT_<KEY>    initial value of a control key, e.g. HSMAGENT_FAULT_SIGN_LATENCY_US
 *
 * Only C_GetFunctionList is exported: every other entry point is reached
 * through the function list it returns, which is a copy of the real module's
 * list with some entries replaced by the wrappers below. Keeping the wrappers
 * static also means the real module's own C_* symbols can never resolve to them.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CK_PTR *
#define CK_DEFINE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType(*name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType(*name)
#ifndef NULL_PTR
#define NULL_PTR NULL
#endif
#include "pkcs11.h"

#define DEFAULT_REAL_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define HANG_POLL_NS (5 * 1000 * 1000)
#define MAX_CONTROL_BYTES 65536

/* Wrapped calls are grouped into ops; fail_ops, hang_ops and the counters use these names. */
enum op {
	OP_INITIALIZE, /* C_Initialize */
	OP_FINALIZE,   /* C_Finalize */
	OP_SLOTS,      /* C_GetSlotList, C_GetSlotInfo */
	OP_TOKENINFO,  /* C_GetTokenInfo */
	OP_OPEN,       /* C_OpenSession */
	OP_LOGIN,      /* C_Login */
	OP_FIND,       /* C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal */
	OP_ATTR,       /* C_GetAttributeValue */
	OP_GENERATE,   /* C_GenerateKeyPair */
	OP_SIGNINIT,   /* C_SignInit */
	OP_SIGN,       /* C_Sign, C_SignUpdate, C_SignFinal (not their length queries) */
	OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
	"initialize", "finalize", "slots", "tokeninfo", "open", "login",
	"find", "attr", "generate", "signinit", "sign",
};

#define OPS_ALL ((1u << OP_COUNT) - 1)

/* Counters kept per op in the stats file. */
enum field { F_CALLS, F_FORWARDED, F_FAILED, F_HUNG, F_WAITING, F_REPLAYED, F_SLEPT, F_SLEPT_NS, F_LATE_NS, F_COUNT };

static const char *const field_names[F_COUNT] = {"calls",    "forwarded", "failed",  "hung",   "waiting",
						 "replayed", "slept",     "slept_ns", "late_ns"};

#define STATS_HEADER_BYTES 512

struct controls {
	long sign_latency_us; /* before C_Sign, C_SignUpdate, C_SignFinal */
	long latency_us;      /* before every other wrapped call */
	CK_RV fail;           /* CKR_OK: no failures */
	long fail_count;      /* < 0: fail while set; otherwise the next N calls */
	unsigned fail_ops;
	int hang;     /* 1: until the file says otherwise; 2 (hang=forever): for ever */
	unsigned hang_ops;
	int crash;    /* the process dies of SIGSEGV inside a call of crash_ops */
	unsigned crash_ops;
	int token_absent;
	int replay; /* off-host shape: a signature made once is answered again without the real module */
};

/* The identity of the control file as last read: any rename or write changes it. */
struct file_id {
	int exists;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime, ctime;
};

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST_PTR real;  /* the real module's list; NULL if loading failed */
static CK_FUNCTION_LIST wrapped;   /* what C_GetFunctionList hands out */

static char *control_path; /* NULL: no control file, the environment alone decides */
static struct controls base; /* from the environment */

/*
 * cur, seen and fail_left change together under mu. mu is only ever held
 * while comparing or parsing, never while sleeping, hanging or calling the
 * real module, so that concurrent callers' latencies overlap.
 */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct controls cur;
static struct file_id seen;
static long fail_left;
static int close_pending; /* the token just went absent: close the real sessions */

/*
 * The counters: a mapping of the stats file after its header, or NULL when not
 * counting. It is never unmapped: at exit, library destructors run while other
 * threads may still be counting (or hung in a wrapper).
 */
static uint64_t *stats;

static void warnf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warnf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("hsmagent-fault: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static void count(enum op op, enum field f, int64_t delta)
{
	if (stats != NULL)
		__atomic_fetch_add(&stats[op * F_COUNT + f], (uint64_t)delta, __ATOMIC_RELAXED);
}

/* ---- control values ---- */

#define CODE(name) {#name, name}
static const struct {
	const char *name;
	CK_RV code;
} codes[] = {
	CODE(CKR_OK),
	CODE(CKR_CANCEL),
	CODE(CKR_HOST_MEMORY),
	CODE(CKR_SLOT_ID_INVALID),
	CODE(CKR_GENERAL_ERROR),
	CODE(CKR_FUNCTION_FAILED),
	CODE(CKR_ARGUMENTS_BAD),
	CODE(CKR_DATA_LEN_RANGE),
	CODE(CKR_DEVICE_ERROR),
	CODE(CKR_DEVICE_MEMORY),
	CODE(CKR_DEVICE_REMOVED),
	CODE(CKR_FUNCTION_CANCELED),
	CODE(CKR_FUNCTION_NOT_SUPPORTED),
	CODE(CKR_KEY_HANDLE_INVALID),
	CODE(CKR_MECHANISM_INVALID),
	CODE(CKR_OBJECT_HANDLE_INVALID),
	CODE(CKR_OPERATION_ACTIVE),
	CODE(CKR_OPERATION_NOT_INITIALIZED),
	CODE(CKR_PIN_INCORRECT),
	CODE(CKR_PIN_LOCKED),
	CODE(CKR_SESSION_CLOSED),
	CODE(CKR_SESSION_COUNT),
	CODE(CKR_SESSION_HANDLE_INVALID),
	CODE(CKR_TOKEN_NOT_PRESENT),
	CODE(CKR_TOKEN_NOT_RECOGNIZED),
	CODE(CKR_USER_NOT_LOGGED_IN),
	CODE(CKR_CRYPTOKI_NOT_INITIALIZED),
	CODE(CKR_CRYPTOKI_ALREADY_INITIALIZED),
};

/* parse_code accepts CKR_ names (the prefix is optional, case ignored) and numbers (0x30, 48). */
static int parse_code(const char *s, CK_RV *out)
{
	if (*s == '\0' || strcasecmp(s, "none") == 0) {
		*out = CKR_OK;
		return 0;
	}
	for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
		if (strcasecmp(s, codes[i].name) == 0 || strcasecmp(s, codes[i].name + 4) == 0) {
			*out = codes[i].code;
			return 0;
		}
	}
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 0);
	if (errno != 0 || *end != '\0' || !isdigit((unsigned char)*s))
		return -1;
	*out = (CK_RV)v;
	return 0;
}

static int parse_long(const char *s, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno != 0 || *s == '\0' || *end != '\0')
		return -1;
	*out = v;
	return 0;
}

static int parse_bool(const char *s, int *out)
{
	if (strcmp(s, "1") == 0 || strcasecmp(s, "true") == 0 || strcasecmp(s, "yes") == 0) {
		*out = 1;
		return 0;
	}
	if (*s == '\0' || strcmp(s, "0") == 0 || strcasecmp(s, "false") == 0 || strcasecmp(s, "no") == 0) {
		*out = 0;
		return 0;
	}
	return -1;
}

/* parse_ops reads "all" or a comma list of op names. */
static int parse_ops(const char *s, unsigned *out)
{
	unsigned ops = 0;
	char buf[256];
	if (strlen(s) >= sizeof buf)
		return -1;
	strcpy(buf, s);
	char *save = NULL;
	for (char *tok = strtok_r(buf, ", ", &save); tok != NULL; tok = strtok_r(NULL, ", ", &save)) {
		if (strcasecmp(tok, "all") == 0) {
			ops = OPS_ALL;
			continue;
		}
		int found = 0;
		for (int i = 0; i < OP_COUNT; i++) {
			if (strcasecmp(tok, op_names[i]) == 0) {
				ops |= 1u << i;
				found = 1;
			}
		}
		if (!found)
			return -1;
	}
	*out = ops;
	return 0;
}

/* The keys a control file or HSMAGENT_FAULT_<KEY> may set. */
static const char *const keys[] = {
	"sign_latency_us", "latency_us", "fail", "fail_count", "fail_ops",
	"hang", "hang_ops", "crash", "crash_ops", "token_absent", "replay", "generation",
};

/* set applies one key=value to c; where names the source for warnings. */
static void set(struct controls *c, const char *key, const char *val, const char *where)
{
	int bad = 0;
	if (strcmp(key, "sign_latency_us") == 0)
		bad = parse_long(val, &c->sign_latency_us) || c->sign_latency_us < 0;
	else if (strcmp(key, "latency_us") == 0)
		bad = parse_long(val, &c->latency_us) || c->latency_us < 0;
	else if (strcmp(key, "fail") == 0)
		bad = parse_code(val, &c->fail);
	else if (strcmp(key, "fail_count") == 0)
		bad = *val != '\0' && parse_long(val, &c->fail_count);
	else if (strcmp(key, "fail_ops") == 0)
		bad = parse_ops(val, &c->fail_ops);
	else if (strcmp(key, "hang") == 0 && strcmp(val, "forever") == 0)
		c->hang = 2;
	else if (strcmp(key, "hang") == 0)
		bad = parse_bool(val, &c->hang);
	else if (strcmp(key, "crash") == 0)
		bad = parse_bool(val, &c->crash);
	else if (strcmp(key, "crash_ops") == 0)
		bad = parse_ops(val, &c->crash_ops);
	else if (strcmp(key, "hang_ops") == 0)
		bad = parse_ops(val, &c->hang_ops);
	else if (strcmp(key, "token_absent") == 0)
		bad = parse_bool(val, &c->token_absent);
	else if (strcmp(key, "replay") == 0)
		bad = parse_bool(val, &c->replay);
	else if (strcmp(key, "generation") == 0)
		; /* only there to make each write differ */
	else {
		warnf("%s: unknown key %s", where, key);
		return;
	}
	if (bad)
		warnf("%s: bad value %s=%s, ignored", where, key, val);
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

/* parse_control applies the key=value lines of text to c; '#' starts a comment. */
static void parse_control(char *text, struct controls *c)
{
	int lineno = 0;
	for (char *line = text, *next; line != NULL; line = next) {
		lineno++;
		next = strchr(line, '\n');
		if (next != NULL)
			*next++ = '\0';
		char *hash = strchr(line, '#');
		if (hash != NULL)
			*hash = '\0';
		line = trim(line);
		if (*line == '\0')
			continue;
		char where[64];
		snprintf(where, sizeof where, "control file line %d", lineno);
		char *eq = strchr(line, '=');
		if (eq == NULL) {
			warnf("%s: no '=' in %s", where, line);
			continue;
		}
		*eq = '\0';
		set(c, trim(line), trim(eq + 1), where);
	}
}

static void controls_from_env(struct controls *c)
{
	memset(c, 0, sizeof *c);
	c->fail_count = -1;
	c->fail_ops = 1u << OP_SIGN;
	c->hang_ops = 1u << OP_SIGN;
	c->crash_ops = 1u << OP_SIGN;
	for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
		char name[64] = "HSMAGENT_FAULT_";
		size_t n = strlen(name);
		for (const char *k = keys[i]; *k != '\0' && n < sizeof name - 1; k++)
			name[n++] = (char)toupper((unsigned char)*k);
		name[n] = '\0';
		const char *v = getenv(name);
		if (v != NULL && *v != '\0')
			set(c, keys[i], v, name);
	}
}

static void file_id_of(const struct stat *st, struct file_id *id)
{
	memset(id, 0, sizeof *id);
	id->exists = 1;
	id->dev = st->st_dev;
	id->ino = st->st_ino;
	id->size = st->st_size;
	id->mtime = st->st_mtim;
	id->ctime = st->st_ctim;
}

static int file_id_equal(const struct file_id *a, const struct file_id *b)
{
	return a->exists == b->exists && a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
	       a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec &&
	       a->ctime.tv_sec == b->ctime.tv_sec && a->ctime.tv_nsec == b->ctime.tv_nsec;
}

/* reload_locked rereads the control file (already opened as fd, or absent if fd < 0). */
static void reload_locked(int fd)
{
	struct controls c = base;
	struct file_id id;
	memset(&id, 0, sizeof id);
	struct stat st;
	if (fd >= 0 && fstat(fd, &st) == 0) {
		file_id_of(&st, &id);
		char *text = malloc(MAX_CONTROL_BYTES + 1);
		if (text != NULL) {
			ssize_t n, total = 0;
			while (total < MAX_CONTROL_BYTES &&
			       (n = read(fd, text + total, MAX_CONTROL_BYTES - total)) > 0)
				total += n;
			text[total] = '\0';
			parse_control(text, &c);
			free(text);
		}
	}
	if (c.token_absent && !cur.token_absent)
		close_pending = 1;
	cur = c;
	seen = id;
	/* The count restarts with every new version of the controls, in each process. */
	fail_left = c.fail_count;
}

/*
 * current refreshes the controls if the control file changed and copies them
 * to out. The stat is the whole cost when nothing changed.
 */
static void current(struct controls *out)
{
	int closing = 0;
	if (control_path != NULL) {
		struct stat st;
		struct file_id id;
		memset(&id, 0, sizeof id);
		if (stat(control_path, &st) == 0)
			file_id_of(&st, &id);
		pthread_mutex_lock(&mu);
		if (!file_id_equal(&id, &seen)) {
			int fd = open(control_path, O_RDONLY | O_CLOEXEC);
			reload_locked(fd);
			if (fd >= 0)
				close(fd);
		}
		*out = cur;
		closing = close_pending;
		close_pending = 0;
		pthread_mutex_unlock(&mu);
	} else {
		pthread_mutex_lock(&mu);
		*out = cur;
		pthread_mutex_unlock(&mu);
	}
	if (closing) {
		/* A pulled token takes its sessions with it: old handles must stop working. */
		CK_ULONG n = 0;
		if (real->C_GetSlotList(CK_FALSE, NULL, &n) == CKR_OK && n > 0) {
			CK_SLOT_ID *slots = calloc(n, sizeof *slots);
			if (slots != NULL && real->C_GetSlotList(CK_FALSE, slots, &n) == CKR_OK) {
				for (CK_ULONG i = 0; i < n; i++)
					real->C_CloseAllSessions(slots[i]);
			}
			free(slots);
		}
	}
}

/* take_failure decides, and consumes from the count, whether this call of op fails. */
static CK_RV take_failure(enum op op)
{
	CK_RV rv = CKR_OK;
	pthread_mutex_lock(&mu);
	if (cur.fail != CKR_OK && (cur.fail_ops & (1u << op)) != 0) {
		if (fail_left < 0) {
			rv = cur.fail;
		} else if (fail_left > 0) {
			fail_left--;
			rv = cur.fail;
		}
	}
	pthread_mutex_unlock(&mu);
	return rv;
}

/* An address no mapping holds; volatile, so that the compiler cannot see it. */
static volatile uintptr_t crash_address = 8;

static void sleep_ns(long long ns)
{
	struct timespec ts = {.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/*
 * enter runs the controls for one call of op: it waits while hung, sleeps the
 * latency, then returns the error to inject (CKR_OK to forward). c receives
 * the controls in force after the wait.
 */
static CK_RV enter(enum op op, struct controls *c)
{
	count(op, F_CALLS, 1);
	current(c);
	if (c->crash && (c->crash_ops & (1u << op)) != 0) {
		/* As a vendor module's bug would: a write through a bad pointer,
		 * which the process's SIGSEGV handler (Go's) sees in C code. */
		warnf("crash=1: dying of SIGSEGV in %s", op_names[op]);
		*(volatile int *)crash_address = 1;
	}
	if (c->hang == 2 && (c->hang_ops & (1u << op)) != 0) {
		/* hang=forever: the call never returns, whatever the file says next. */
		count(op, F_HUNG, 1);
		count(op, F_WAITING, 1);
		for (;;)
			pause();
	}
	if (c->hang && (c->hang_ops & (1u << op)) != 0) {
		count(op, F_HUNG, 1);
		count(op, F_WAITING, 1);
		do {
			sleep_ns(HANG_POLL_NS);
			current(c);
		} while (c->hang && (c->hang_ops & (1u << op)) != 0);
		count(op, F_WAITING, -1);
	}
	long us = op == OP_SIGN ? c->sign_latency_us : c->latency_us;
	if (us > 0) {
		/* What the sleep took, against what was asked: the wake-up
		 * latency of the calling process (timer slack, scheduling). */
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		sleep_ns((long long)us * 1000);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		int64_t took = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
		count(op, F_SLEPT, 1);
		count(op, F_SLEPT_NS, took);
		count(op, F_LATE_NS, took - (int64_t)us * 1000);
	}
	CK_RV rv = take_failure(op);
	if (rv != CKR_OK)
		count(op, F_FAILED, 1);
	return rv;
}

static CK_RV forwarded(enum op op, CK_RV rv)
{
	count(op, F_FORWARDED, 1);
	return rv;
}

/* refuse answers a call with an error of the fault module's own (token absent). */
static CK_RV refuse(enum op op, CK_RV rv)
{
	count(op, F_FAILED, 1);
	return rv;
}

/*
 * end_sign finishes the real signing operation after an injected failure:
 * in PKCS#11 a failed C_Sign, C_SignUpdate or C_SignFinal ends the operation,
 * and without this the session would answer CKR_OPERATION_ACTIVE to the next
 * C_SignInit. The signature goes to a scratch buffer and is not counted.
 */
static void end_sign(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG len, int single)
{
	CK_ULONG n = 0;
	CK_RV rv = single ? real->C_Sign(h, data, len, NULL, &n) : real->C_SignFinal(h, NULL, &n);
	if (rv != CKR_OK)
		return; /* no operation left, or it ended on that error */
	CK_BYTE *buf = malloc(n > 0 ? n : 1);
	if (buf == NULL)
		return;
	if (single)
		real->C_Sign(h, data, len, buf, &n);
	else
		real->C_SignFinal(h, buf, &n);
	free(buf);
}

/* ---- replay: the off-host shape ---- */

/*
 * With replay set, the module behaves like a network HSM's client library:
 * the signing happens elsewhere, and this host only waits. C_SignInit is
 * only noted; C_Sign of a (key, mechanism, data) already signed once sleeps
 * sign_latency_us and returns that signature again, without calling the real
 * module, so that the host's CPU per signature is the caller's alone. A
 * first signature (a miss) is made by the real module and kept. Multi-part
 * signing is forwarded. Both tables are fixed in size: a miss or a
 * collision costs a real signature, never memory.
 */
#define REPLAY_SESSIONS 4096
#define REPLAY_ENTRIES 4096
#define REPLAY_MAX_DATA 64      /* digests; longer data is always signed for real */
#define REPLAY_MAX_PARAM 32     /* mechanism parameters (PSS) */
#define REPLAY_MAX_SIG 1024     /* up to RSA 8192 */

struct pending_sign { /* a C_SignInit noted for C_Sign */
	int used;
	int forwarded; /* started in the real module already (after a length query missed) */
	CK_SESSION_HANDLE h;
	CK_OBJECT_HANDLE key;
	CK_MECHANISM_TYPE mech;
	CK_ULONG param_len;
	CK_BYTE param[REPLAY_MAX_PARAM];
};

struct replay_entry {
	int used;
	CK_OBJECT_HANDLE key;
	CK_MECHANISM_TYPE mech;
	CK_ULONG param_len, data_len, sig_len;
	CK_BYTE param[REPLAY_MAX_PARAM], data[REPLAY_MAX_DATA], sig[REPLAY_MAX_SIG];
};

static pthread_mutex_t replay_mu = PTHREAD_MUTEX_INITIALIZER;
static struct pending_sign pending[REPLAY_SESSIONS];
static struct replay_entry replays[REPLAY_ENTRIES];

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 1099511628211ULL;
	return h;
}

static struct replay_entry *replay_slot(const struct pending_sign *ps, CK_BYTE_PTR data, CK_ULONG len)
{
	uint64_t h = fnv(14695981039346656037ULL, &ps->key, sizeof ps->key);
	h = fnv(h, &ps->mech, sizeof ps->mech);
	h = fnv(h, ps->param, ps->param_len);
	h = fnv(h, data, len);
	return &replays[h % REPLAY_ENTRIES];
}

static int replay_matches(const struct replay_entry *e, const struct pending_sign *ps, CK_BYTE_PTR data, CK_ULONG len)
{
	return e->used && e->key == ps->key && e->mech == ps->mech && e->param_len == ps->param_len &&
	       memcmp(e->param, ps->param, ps->param_len) == 0 && e->data_len == len && memcmp(e->data, data, len) == 0;
}

/* note_sign_init keeps a C_SignInit for a later C_Sign; 0 if it cannot (forward it now). */
static int note_sign_init(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key)
{
	if (mech == NULL || mech->ulParameterLen > REPLAY_MAX_PARAM)
		return 0;
	struct pending_sign *ps = &pending[h % REPLAY_SESSIONS];
	pthread_mutex_lock(&replay_mu);
	int ok = !ps->used || ps->h == h;
	if (ok) {
		ps->used = 1;
		ps->forwarded = 0;
		ps->h = h;
		ps->key = key;
		ps->mech = mech->mechanism;
		ps->param_len = mech->ulParameterLen;
		if (mech->ulParameterLen > 0)
			memcpy(ps->param, mech->pParameter, mech->ulParameterLen);
	}
	pthread_mutex_unlock(&replay_mu);
	return ok;
}

/* take_pending removes and returns session h's noted C_SignInit; 0 if none. */
static int take_pending(CK_SESSION_HANDLE h, struct pending_sign *out)
{
	struct pending_sign *ps = &pending[h % REPLAY_SESSIONS];
	pthread_mutex_lock(&replay_mu);
	int ok = ps->used && ps->h == h;
	if (ok) {
		*out = *ps;
		ps->used = 0;
	}
	pthread_mutex_unlock(&replay_mu);
	return ok;
}

/* mark_forwarded notes that session h's operation is now active in the real module. */
static void mark_forwarded(const struct pending_sign *from)
{
	struct pending_sign *ps = &pending[from->h % REPLAY_SESSIONS];
	pthread_mutex_lock(&replay_mu);
	*ps = *from;
	ps->used = 1;
	ps->forwarded = 1;
	pthread_mutex_unlock(&replay_mu);
}

/* peek_pending copies session h's noted C_SignInit without removing it. */
static int peek_pending(CK_SESSION_HANDLE h, struct pending_sign *out)
{
	struct pending_sign *ps = &pending[h % REPLAY_SESSIONS];
	pthread_mutex_lock(&replay_mu);
	int ok = ps->used && ps->h == h;
	if (ok)
		*out = *ps;
	pthread_mutex_unlock(&replay_mu);
	return ok;
}

/* forward_init starts, in the real module, a signing operation noted earlier. */
static CK_RV forward_init(const struct pending_sign *ps)
{
	CK_MECHANISM m = {ps->mech, ps->param_len > 0 ? (CK_VOID_PTR)ps->param : NULL, ps->param_len};
	return forwarded(OP_SIGNINIT, real->C_SignInit(ps->h, &m, ps->key));
}

/*
 * replayed answers a C_Sign from the table: 1 with *rv set if it did (the
 * signature, its length, or CKR_BUFFER_TOO_SMALL), 0 on a miss.
 */
static int replayed(const struct pending_sign *ps, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig, CK_ULONG_PTR siglen, CK_RV *rv)
{
	if (len > REPLAY_MAX_DATA)
		return 0;
	pthread_mutex_lock(&replay_mu);
	struct replay_entry *e = replay_slot(ps, data, len);
	int hit = replay_matches(e, ps, data, len);
	if (hit) {
		if (sig == NULL) {
			*rv = CKR_OK;
		} else if (*siglen < e->sig_len) {
			*rv = CKR_BUFFER_TOO_SMALL;
		} else {
			memcpy(sig, e->sig, e->sig_len);
			*rv = CKR_OK;
		}
		*siglen = e->sig_len;
	}
	pthread_mutex_unlock(&replay_mu);
	return hit;
}

static void keep_replay(const struct pending_sign *ps, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig, CK_ULONG siglen)
{
	if (len > REPLAY_MAX_DATA || siglen > REPLAY_MAX_SIG)
		return;
	pthread_mutex_lock(&replay_mu);
	struct replay_entry *e = replay_slot(ps, data, len);
	e->used = 1;
	e->key = ps->key;
	e->mech = ps->mech;
	e->param_len = ps->param_len;
	memcpy(e->param, ps->param, ps->param_len);
	e->data_len = len;
	memcpy(e->data, data, len);
	e->sig_len = siglen;
	memcpy(e->sig, sig, siglen);
	pthread_mutex_unlock(&replay_mu);
}

/* ---- wrappers ---- */

static CK_RV w_Initialize(CK_VOID_PTR args)
{
	struct controls c;
	CK_RV rv = enter(OP_INITIALIZE, &c);
	if (rv != CKR_OK)
		return rv;
	return forwarded(OP_INITIALIZE, real->C_Initialize(args));
}

static CK_RV w_Finalize(CK_VOID_PTR reserved)
{
	struct controls c;
	CK_RV injected = enter(OP_FINALIZE, &c);
	/* Forwarded even when failing, so that nothing stays open in the real module. */
	CK_RV rv = forwarded(OP_FINALIZE, real->C_Finalize(reserved));
	return injected != CKR_OK ? injected : rv;
}

static CK_RV w_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR n)
{
	struct controls c;
	CK_RV rv = enter(OP_SLOTS, &c);
	if (rv != CKR_OK)
		return rv;
	if (c.token_absent && present && n != NULL) {
		*n = 0;
		return CKR_OK;
	}
	return forwarded(OP_SLOTS, real->C_GetSlotList(present, list, n));
}

static CK_RV w_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
	struct controls c;
	CK_RV rv = enter(OP_SLOTS, &c);
	if (rv != CKR_OK)
		return rv;
	rv = forwarded(OP_SLOTS, real->C_GetSlotInfo(slot, info));
	if (rv == CKR_OK && c.token_absent && info != NULL)
		info->flags &= ~CKF_TOKEN_PRESENT;
	return rv;
}

static CK_RV w_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
	struct controls c;
	CK_RV rv = enter(OP_TOKENINFO, &c);
	if (rv != CKR_OK)
		return rv;
	if (c.token_absent)
		return refuse(OP_TOKENINFO, CKR_TOKEN_NOT_PRESENT);
	return forwarded(OP_TOKENINFO, real->C_GetTokenInfo(slot, info));
}

static CK_RV w_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
			   CK_SESSION_HANDLE_PTR h)
{
	struct controls c;
	CK_RV rv = enter(OP_OPEN, &c);
	if (rv != CKR_OK)
		return rv;
	if (c.token_absent)
		return refuse(OP_OPEN, CKR_TOKEN_NOT_PRESENT);
	return forwarded(OP_OPEN, real->C_OpenSession(slot, flags, app, notify, h));
}

static CK_RV w_Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	struct controls c;
	CK_RV rv = enter(OP_LOGIN, &c);
	if (rv != CKR_OK)
		return rv;
	return forwarded(OP_LOGIN, real->C_Login(h, user, pin, len));
}

static CK_RV w_FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n)
{
	struct controls c;
	CK_RV rv = enter(OP_FIND, &c);
	if (rv != CKR_OK)
		return rv;
	return forwarded(OP_FIND, real->C_FindObjectsInit(h, tmpl, n));
}

static CK_RV w_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR objs, CK_ULONG max, CK_ULONG_PTR n)
{
	struct controls c;
	CK_RV rv = enter(OP_FIND, &c);
	if (rv != CKR_OK)
		return rv;
	return forwarded(OP_FIND, real->C_FindObjects(h, objs, max, n));
}

static CK_RV w_FindObjectsFinal(CK_SESSION_HANDLE h)
{
	struct controls c;
	CK_RV injected = enter(OP_FIND, &c);
	/* Forwarded even when failing: a search left open would block the session's next one. */
	CK_RV rv = forwarded(OP_FIND, real->C_FindObjectsFinal(h));
	return injected != CKR_OK ? injected : rv;
}

static CK_RV w_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n)
{
	struct controls c;
	CK_RV rv = enter(OP_ATTR, &c);
	if (rv != CKR_OK)
		return rv;
	return forwarded(OP_ATTR, real->C_GetAttributeValue(h, obj, tmpl, n));
}

static CK_RV w_GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech, CK_ATTRIBUTE_PTR pub,
			       CK_ULONG npub, CK_ATTRIBUTE_PTR priv, CK_ULONG npriv,
			       CK_OBJECT_HANDLE_PTR hpub, CK_OBJECT_HANDLE_PTR hpriv)
{
	struct controls c;
	CK_RV rv = enter(OP_GENERATE, &c);
	if (rv != CKR_OK)
		return rv;
	return forwarded(OP_GENERATE, real->C_GenerateKeyPair(h, mech, pub, npub, priv, npriv, hpub, hpriv));
}

static CK_RV w_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key)
{
	struct controls c;
	CK_RV rv = enter(OP_SIGNINIT, &c);
	if (rv != CKR_OK)
		return rv;
	if (c.replay && note_sign_init(h, mech, key))
		return CKR_OK; /* forwarded at C_Sign, and only on a miss */
	return forwarded(OP_SIGNINIT, real->C_SignInit(h, mech, key));
}

/*
 * replay_sign is C_Sign for a session whose C_SignInit was noted: a hit is
 * answered from the table after the latency; a miss starts the operation in
 * the real module and signs there, keeping the signature.
 */
static CK_RV replay_sign(const struct pending_sign *noted, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig, CK_ULONG_PTR siglen)
{
	struct pending_sign ps = *noted;
	CK_SESSION_HANDLE h = ps.h;
	CK_RV rv;
	if (siglen == NULL)
		return CKR_ARGUMENTS_BAD;
	if (sig == NULL) { /* a length query: the operation goes on */
		if (!ps.forwarded && replayed(&ps, data, len, NULL, siglen, &rv))
			return rv;
		if (!ps.forwarded) {
			if ((rv = forward_init(&ps)) != CKR_OK) {
				take_pending(h, &ps);
				return rv;
			}
			mark_forwarded(&ps);
		}
		return real->C_Sign(h, data, len, NULL, siglen);
	}
	take_pending(h, &ps);
	struct controls c;
	rv = enter(OP_SIGN, &c);
	if (rv != CKR_OK) {
		if (ps.forwarded)
			end_sign(h, data, len, 1);
		return rv;
	}
	if (!ps.forwarded && replayed(&ps, data, len, sig, siglen, &rv)) {
		if (rv == CKR_BUFFER_TOO_SMALL) { /* the operation stays active, as in PKCS#11 */
			CK_MECHANISM m = {ps.mech, ps.param_len > 0 ? ps.param : NULL, ps.param_len};
			note_sign_init(h, &m, ps.key);
		} else {
			count(OP_SIGN, F_REPLAYED, 1);
		}
		return rv;
	}
	if (!ps.forwarded && (rv = forward_init(&ps)) != CKR_OK)
		return forwarded(OP_SIGN, rv);
	rv = real->C_Sign(h, data, len, sig, siglen);
	if (rv == CKR_OK)
		keep_replay(&ps, data, len, sig, *siglen);
	else if (rv == CKR_BUFFER_TOO_SMALL)
		mark_forwarded(&ps);
	return forwarded(OP_SIGN, rv);
}

static CK_RV w_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig, CK_ULONG_PTR siglen)
{
	/*
	 * A length query signs nothing, and a network HSM's client library can
	 * answer it locally: it passes straight through, uncounted.
	 */
	struct pending_sign ps;
	if (peek_pending(h, &ps))
		return replay_sign(&ps, data, len, sig, siglen);
	if (sig == NULL)
		return real->C_Sign(h, data, len, sig, siglen);
	struct controls c;
	CK_RV rv = enter(OP_SIGN, &c);
	if (rv != CKR_OK) {
		end_sign(h, data, len, 1);
		return rv;
	}
	return forwarded(OP_SIGN, real->C_Sign(h, data, len, sig, siglen));
}

static CK_RV w_SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG len)
{
	struct pending_sign ps;
	if (take_pending(h, &ps) && !ps.forwarded) { /* multi-part is not replayed: start it for real */
		CK_RV irv = forward_init(&ps);
		if (irv != CKR_OK)
			return irv;
	}
	struct controls c;
	CK_RV rv = enter(OP_SIGN, &c);
	if (rv != CKR_OK) {
		end_sign(h, NULL, 0, 0);
		return rv;
	}
	return forwarded(OP_SIGN, real->C_SignUpdate(h, part, len));
}

static CK_RV w_SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG_PTR siglen)
{
	if (sig == NULL)
		return real->C_SignFinal(h, sig, siglen);
	struct controls c;
	CK_RV rv = enter(OP_SIGN, &c);
	if (rv != CKR_OK) {
		end_sign(h, NULL, 0, 0);
		return rv;
	}
	return forwarded(OP_SIGN, real->C_SignFinal(h, sig, siglen));
}

/* ---- loading ---- */

/*
 * open_stats maps the counter file. Its layout, for readers: a 512-byte text
 * header (NUL padded) naming the ops and fields in order, then for each op
 * one little-endian uint64 per field. Counters only grow (except "waiting",
 * the calls hung right now) and add up over every process sharing the file.
 */
static void open_stats(const char *path)
{
	char header[STATS_HEADER_BYTES];
	memset(header, 0, sizeof header);
	size_t n = (size_t)snprintf(header, sizeof header, "hsmagent-fault stats 1\nops:");
	for (int i = 0; i < OP_COUNT; i++)
		n += (size_t)snprintf(header + n, sizeof header - n, " %s", op_names[i]);
	n += (size_t)snprintf(header + n, sizeof header - n, "\nfields:");
	for (int i = 0; i < F_COUNT; i++)
		n += (size_t)snprintf(header + n, sizeof header - n, " %s", field_names[i]);
	snprintf(header + n, sizeof header - n, "\n");

	size_t len = STATS_HEADER_BYTES + sizeof(uint64_t) * OP_COUNT * F_COUNT;
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		warnf("stats file %s: %s; not counting", path, strerror(errno));
		return;
	}
	struct stat st;
	/* Only ever grown: another process may be counting in it already. */
	if (fstat(fd, &st) != 0 || ((size_t)st.st_size < len && ftruncate(fd, (off_t)len) != 0)) {
		warnf("stats file %s: %s; not counting", path, strerror(errno));
		close(fd);
		return;
	}
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		warnf("stats file %s: mmap: %s; not counting", path, strerror(errno));
		return;
	}
	int blank = 1;
	for (size_t i = 0; i < STATS_HEADER_BYTES; i++)
		blank &= p[i] == 0;
	if (blank) {
		memcpy(p, header, sizeof header); /* racing writers write the same bytes */
	} else if (memcmp(p, header, sizeof header) != 0) {
		warnf("stats file %s has another layout; not counting", path);
		munmap(p, len);
		return;
	}
	stats = (uint64_t *)(p + STATS_HEADER_BYTES);
}

/*
 * per_process returns path with its first "%p" replaced by this process's
 * id, so that each process can count in a file of its own (the agent's
 * worker apart from the process that started it). Without "%p", path.
 */
static const char *per_process(const char *path)
{
	const char *at = strstr(path, "%p");
	if (at == NULL)
		return path;
	size_t n = strlen(path) + 24;
	char *out = malloc(n);
	if (out == NULL)
		return path;
	snprintf(out, n, "%.*s%ld%s", (int)(at - path), path, (long)getpid(), at + 2);
	return out;
}

static void load(void)
{
	/*
	 * Stay loaded once loaded: callers such as crypto11 unload the module
	 * when they close their last context and load it again when reopening,
	 * and the controls' state (how much of fail_count is used up, whether
	 * the token was already seen absent) must survive that within a process.
	 */
	Dl_info self;
	if (dladdr((void *)C_GetFunctionList, &self) != 0 && self.dli_fname != NULL)
		dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);

	const char *path = getenv("HSMAGENT_FAULT_MODULE");
	if (path == NULL || *path == '\0')
		path = DEFAULT_REAL_MODULE;
	/* The real module stays loaded for the life of the process; it is shared by every load of this one. */
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		warnf("cannot load the real module %s (HSMAGENT_FAULT_MODULE): %s", path, dlerror());
		return;
	}
	CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
	if (get == NULL || get == C_GetFunctionList) {
		warnf("%s is not a PKCS#11 module, or is this fault module itself", path);
		return;
	}
	CK_FUNCTION_LIST_PTR list = NULL;
	CK_RV rv = get(&list);
	if (rv != CKR_OK || list == NULL) {
		warnf("%s: C_GetFunctionList returned 0x%lx", path, (unsigned long)rv);
		return;
	}

	controls_from_env(&base);
	cur = base;
	fail_left = base.fail_count;
	const char *ctl = getenv("HSMAGENT_FAULT_CONTROL");
	if (ctl != NULL && *ctl != '\0')
		control_path = strdup(ctl);
	const char *st = getenv("HSMAGENT_FAULT_STATS");
	if (st != NULL && *st != '\0')
		open_stats(per_process(st));

	wrapped = *list;
	wrapped.C_GetFunctionList = C_GetFunctionList;
	wrapped.C_Initialize = w_Initialize;
	wrapped.C_Finalize = w_Finalize;
	wrapped.C_GetSlotList = w_GetSlotList;
	wrapped.C_GetSlotInfo = w_GetSlotInfo;
	wrapped.C_GetTokenInfo = w_GetTokenInfo;
	wrapped.C_OpenSession = w_OpenSession;
	wrapped.C_Login = w_Login;
	wrapped.C_FindObjectsInit = w_FindObjectsInit;
	wrapped.C_FindObjects = w_FindObjects;
	wrapped.C_FindObjectsFinal = w_FindObjectsFinal;
	wrapped.C_GetAttributeValue = w_GetAttributeValue;
	wrapped.C_GenerateKeyPair = w_GenerateKeyPair;
	wrapped.C_SignInit = w_SignInit;
	wrapped.C_Sign = w_Sign;
	wrapped.C_SignUpdate = w_SignUpdate;
	wrapped.C_SignFinal = w_SignFinal;
	real = list;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
	if (out == NULL)
		return CKR_ARGUMENTS_BAD;
	pthread_once(&load_once, load);
	if (real == NULL)
		return CKR_GENERAL_ERROR;
	*out = &wrapped;
	return CKR_OK;
}
