/*
 * thin_ops: the C baseline for the thin benchmarks (bench/thin_lifecycle.py,
 * bench/scale.py).
 *
 * Makes the libdevmapper calls that a libdm thin operation needs -- the
 * pool messages and the thin device's tasks, made the way libdm/dm/ops.py
 * and libdm/dm/task.py make them -- with no state kept anywhere but in
 * this process's memory: no store, no journal, no lock file, no guard
 * status reads or existence checks.  The difference between libdm and
 * this program is therefore what libdm's state store, locks and checks
 * cost (plus Python).
 *
 * One process serves a whole run: it reads requests on stdin, one per line,
 * and answers each with one JSON line on stdout, timing its own loop.
 *
 *   pool NAME                 work on the thin-pool device NAME from now on:
 *                             reads its devno (info) and transaction id
 *                             (status); answers {"txid": T, "devno": "M:m"}
 *   create PREFIX ID N SIZE   N x create_thin + activate: ids ID..ID+N-1,
 *                             devices NAME-PREFIX<id> of SIZE sectors
 *   snap PREFIX ID N OPREFIX OID SIZE
 *                             N x snapshot of an active origin: id ID+i is a
 *                             snapshot of id OID+i (device NAME-OPREFIX<OID+i>,
 *                             suspended around the message), then activated
 *                             as NAME-PREFIX<ID+i>
 *   delete PREFIX ID N        N x deactivate + delete of ids ID..ID+N-1
 *   thin ID N                 N x create_thin with no activation (building
 *                             a large pool)
 *   activate PREFIX ID N SIZE N x create/load/resume of existing thin ids
 *   deactivate PREFIX ID N    N x remove of thin devices (ids stay)
 *
 * Each of create, snap, delete, thin, activate, deactivate answers
 * {"op": OP, "n": N, "seconds": S}.
 *
 * The calls, per operation (each task: dm_task_create, set_name, ...,
 * dm_task_run, dm_task_destroy; "cookie" means dm_task_set_cookie with
 * libdm's flags before the run and dm_udev_wait after it):
 *
 *   create_thin:  message "create_thin ID"; message "set_transaction_id T T+1";
 *                 status (no no-flush: commits the pool's metadata);
 *                 CREATE (uuid), RELOAD (thin target), RESUME (cookie, info)
 *   snapshot:     SUSPEND origin; message "create_snap ID OID"; RESUME origin
 *                 (cookie, info); set_transaction_id; status; CREATE, RELOAD,
 *                 RESUME of the snapshot
 *   delete:       REMOVE (deferred, cookie); message "delete ID";
 *                 set_transaction_id; status
 *
 * Messages go to sector 0 and read the response, as libdm.message does.
 * Build:  cc -O2 -o thin_ops thin_ops.c -ldevmapper
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libdevmapper.h>

static char pool[128];
static char pool_devno[32];
static uint64_t txid;

static void fail(const char *what, const char *name, struct dm_task *dmt)
{
	int err = dmt ? dm_task_get_errno(dmt) : 0;

	fprintf(stderr, "thin_ops: %s %s failed (errno %d)\n", what,
		name ? name : "", err);
	exit(1);
}

static struct dm_task *task(int type, const char *name)
{
	struct dm_task *dmt = dm_task_create(type);

	if (!dmt)
		fail("dm_task_create", name, NULL);
	if (name && !dm_task_set_name(dmt, name))
		fail("dm_task_set_name", name, dmt);
	return dmt;
}

/* Task.run(udev=True), as libdm_run_with_cookie in build_ffi.py. */
static int run_udev(struct dm_task *dmt)
{
	uint16_t flags = dm_udev_get_sync_support() ?
		DM_UDEV_DISABLE_LIBRARY_FALLBACK : 0;
	uint32_t cookie = 0;
	int ok;

	if (!dm_task_set_cookie(dmt, &cookie, flags))
		fail("dm_task_set_cookie", NULL, dmt);
	ok = dm_task_run(dmt);
	dm_udev_wait(cookie);
	return ok;
}

static void read_info(struct dm_task *dmt, struct dm_info *info)
{
	volatile const char *name, *uuid;

	if (dm_task_get_info(dmt, info) && info->exists) {
		name = dm_task_get_name(dmt);
		uuid = dm_task_get_uuid(dmt);
		(void)name;
		(void)uuid;
	}
}

/* libdm.message(pool, text): sector 0, the response is read. */
static void message(const char *text)
{
	struct dm_task *dmt = task(DM_DEVICE_TARGET_MSG, pool);
	volatile const char *response;

	if (!dm_task_set_sector(dmt, 0) || !dm_task_set_message(dmt, text))
		fail("message setup", pool, dmt);
	if (!dm_task_run(dmt)) {
		fprintf(stderr, "thin_ops: message '%s': ", text);
		fail("message", pool, dmt);
	}
	response = dm_task_get_message_response(dmt);
	(void)response;
	dm_task_destroy(dmt);
}

/* libdm.status(pool): the pool commits its metadata; the line is walked.
 * Returns the first field of the first line (the transaction id). */
static uint64_t pool_status(void)
{
	struct dm_task *dmt = task(DM_DEVICE_STATUS, pool);
	struct dm_info info;
	uint64_t start, length, tx = 0;
	char *type, *params;
	void *next = NULL;
	int first = 1;

	if (!dm_task_run(dmt))
		fail("status", pool, dmt);
	if (!dm_task_get_info(dmt, &info) || !info.exists)
		fail("status (no device)", pool, dmt);
	do {
		next = dm_get_next_target(dmt, next, &start, &length, &type, &params);
		if (first && params)
			tx = strtoull(params, NULL, 10);
		first = 0;
	} while (next);
	dm_task_destroy(dmt);
	return tx;
}

/* The journal's kernel half: set_transaction_id, then a committing status. */
static void set_transaction(void)
{
	char text[96];

	snprintf(text, sizeof(text), "set_transaction_id %" PRIu64 " %" PRIu64,
		 txid, txid + 1);
	message(text);
	txid++;
	pool_status();
}

static void dev_name(char *buf, size_t size, const char *prefix, long id)
{
	snprintf(buf, size, "%s-%s%ld", pool, prefix, id);
}

/* libdm.create(name, [Target(0, size, "thin", "<pool devno> <id>")], uuid=...) */
static void activate(const char *prefix, long id, uint64_t size)
{
	char name[256], uuid[256], params[64];
	struct dm_task *dmt;
	struct dm_info info;

	dev_name(name, sizeof(name), prefix, id);
	snprintf(uuid, sizeof(uuid), "BENCH-THIN-%s-%ld", pool, id);
	snprintf(params, sizeof(params), "%s %ld", pool_devno, id);

	dmt = task(DM_DEVICE_CREATE, name);
	if (!dm_task_set_uuid(dmt, uuid))
		fail("dm_task_set_uuid", name, dmt);
	if (!dm_task_run(dmt))
		fail("create", name, dmt);
	dm_task_destroy(dmt);

	dmt = task(DM_DEVICE_RELOAD, name);
	if (!dm_task_add_target(dmt, 0, size, "thin", params))
		fail("dm_task_add_target", name, dmt);
	if (!dm_task_run(dmt))
		fail("reload", name, dmt);
	dm_task_destroy(dmt);

	dmt = task(DM_DEVICE_RESUME, name);
	if (!run_udev(dmt))
		fail("resume", name, dmt);
	read_info(dmt, &info);
	dm_task_destroy(dmt);
}

/* libdm.remove(name, deferred=True) */
static void deactivate(const char *prefix, long id)
{
	char name[256];
	struct dm_task *dmt;

	dev_name(name, sizeof(name), prefix, id);
	dmt = task(DM_DEVICE_REMOVE, name);
	if (!dm_task_deferred_remove(dmt))
		fail("dm_task_deferred_remove", name, dmt);
	if (!run_udev(dmt))
		fail("remove", name, dmt);
	dm_task_destroy(dmt);
}

static void suspend_dev(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_SUSPEND, name);

	if (!dm_task_run(dmt))
		fail("suspend", name, dmt);
	dm_task_destroy(dmt);
}

static void resume_dev(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_RESUME, name);
	struct dm_info info;

	if (!run_udev(dmt))
		fail("resume", name, dmt);
	read_info(dmt, &info);
	dm_task_destroy(dmt);
}

static void create_thin(long id)
{
	char text[64];

	snprintf(text, sizeof(text), "create_thin %ld", id);
	message(text);
	set_transaction();
}

static void snapshot(const char *prefix, long id, const char *oprefix, long oid,
		     uint64_t size)
{
	char origin[256], text[64];

	dev_name(origin, sizeof(origin), oprefix, oid);
	snprintf(text, sizeof(text), "create_snap %ld %ld", id, oid);
	suspend_dev(origin);
	message(text);
	resume_dev(origin);
	set_transaction();
	activate(prefix, id, size);
}

static void delete_thin(const char *prefix, long id)
{
	char text[64];

	deactivate(prefix, id);
	snprintf(text, sizeof(text), "delete %ld", id);
	message(text);
	set_transaction();
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report(const char *op, long n, double seconds)
{
	printf("{\"op\": \"%s\", \"n\": %ld, \"seconds\": %.6f}\n", op, n, seconds);
	fflush(stdout);
}

static void use_pool(const char *name)
{
	struct dm_task *dmt;
	struct dm_info info;

	snprintf(pool, sizeof(pool), "%s", name);
	dmt = task(DM_DEVICE_INFO, pool);
	if (!dm_task_run(dmt) || !dm_task_get_info(dmt, &info) || !info.exists)
		fail("info", pool, dmt);
	snprintf(pool_devno, sizeof(pool_devno), "%u:%u", info.major, info.minor);
	dm_task_destroy(dmt);
	txid = pool_status();
	printf("{\"txid\": %" PRIu64 ", \"devno\": \"%s\"}\n", txid, pool_devno);
	fflush(stdout);
}

static int serve(void)
{
	char line[512], op[16], prefix[64], oprefix[64], name[128];
	long id, n, oid, i;
	unsigned long long size;
	double began;

	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "%15s", op) != 1)
			goto bad;
		if (!strcmp(op, "pool")) {
			if (sscanf(line, "%*s %127s", name) != 1)
				goto bad;
			use_pool(name);
			continue;
		}
		if (!pool[0]) {
			fprintf(stderr, "thin_ops: no pool given yet\n");
			return 2;
		}
		began = now();
		if (!strcmp(op, "create") || !strcmp(op, "activate")) {
			if (sscanf(line, "%*s %63s %ld %ld %llu", prefix, &id, &n, &size) != 4)
				goto bad;
			for (i = 0; i < n; i++) {
				if (!strcmp(op, "create"))
					create_thin(id + i);
				activate(prefix, id + i, size);
			}
		} else if (!strcmp(op, "snap")) {
			if (sscanf(line, "%*s %63s %ld %ld %63s %ld %llu", prefix, &id, &n,
				   oprefix, &oid, &size) != 6)
				goto bad;
			for (i = 0; i < n; i++)
				snapshot(prefix, id + i, oprefix, oid + i, size);
		} else if (!strcmp(op, "delete") || !strcmp(op, "deactivate")) {
			if (sscanf(line, "%*s %63s %ld %ld", prefix, &id, &n) != 3)
				goto bad;
			for (i = 0; i < n; i++) {
				if (!strcmp(op, "delete"))
					delete_thin(prefix, id + i);
				else
					deactivate(prefix, id + i);
			}
		} else if (!strcmp(op, "thin")) {
			if (sscanf(line, "%*s %ld %ld", &id, &n) != 2)
				goto bad;
			for (i = 0; i < n; i++)
				create_thin(id + i);
		} else {
			goto bad;
		}
		report(op, n, now() - began);
		continue;
bad:
		fprintf(stderr, "thin_ops: bad request: %s", line);
		return 2;
	}
	return 0;
}

int main(int argc, char **argv)
{
	/* The first task opens the control device and checks the driver
	 * version; libdm has done that before any timed loop. */
	dm_task_destroy(task(DM_DEVICE_VERSION, NULL));
	if (argc == 2 && !strcmp(argv[1], "serve"))
		return serve();
	fprintf(stderr, "usage: thin_ops serve  (requests on stdin, see thin_ops.c)\n");
	return 2;
}
