/*
 * dm_ops: the C baseline for bench/device_ops.py.
 *
 * Makes exactly the libdevmapper calls libdm makes (libdm/dm/ops.py and
 * libdm/dm/task.py), with no Python in between, and prints the elapsed
 * time of the timed loop as one JSON object on stdout.
 *
 *   dm_ops pairs  NAME N [W]  N x (create a 100-sector zero device, remove it)
 *   dm_ops cycles NAME N [W]  create NAME, N x (suspend, resume, status),
 *                             remove NAME; only the cycles are timed
 *
 *   dm_ops serve             read "pairs NAME N" or "cycles NAME N" lines
 *                            on stdin, answer each with a JSON line; here
 *                            cycles work on an existing device NAME
 *
 * W (default 0) untimed operations run first, so that the process's
 * pages are faulted in and its heap has grown, as in a warmed-up Python
 * process (page faults are costly inside User-Mode Linux).  The serve mode
 * lets a benchmark interleave short blocks of C and Python operations in
 * one steady process, so that drift in the kernel's speed hits both alike.
 *
 * Per task, like libdm: dm_task_create, dm_task_set_name, [add_target],
 * [dm_task_set_cookie], dm_task_run, [dm_udev_wait], dm_task_get_errno
 * only on failure, readers, dm_task_destroy.  Build:
 *   cc -O2 -o dm_ops dm_ops.c -ldevmapper
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libdevmapper.h>

static void fail(const char *what, struct dm_task *dmt)
{
	int err = dmt ? dm_task_get_errno(dmt) : 0;

	fprintf(stderr, "dm_ops: %s failed (errno %d)\n", what, err);
	exit(1);
}

/* dm_task_create + dm_task_set_name (skipped when name is NULL). */
static struct dm_task *task(int type, const char *name)
{
	struct dm_task *dmt = dm_task_create(type);

	if (!dmt)
		fail("dm_task_create", NULL);
	if (name && !dm_task_set_name(dmt, name))
		fail("dm_task_set_name", dmt);
	return dmt;
}

/* Task.run(udev=True): a cookie, the run, then always the wait.  The
 * flags are task.py's _udev_flags(): nodes are udev's alone where udev
 * synchronises, libdevmapper's fallback makes them where it does not. */
static int run_udev(struct dm_task *dmt)
{
	uint16_t flags = dm_udev_get_sync_support() ?
		DM_UDEV_DISABLE_LIBRARY_FALLBACK : 0;
	uint32_t cookie = 0;
	int ok;

	if (!dm_task_set_cookie(dmt, &cookie, flags))
		fail("dm_task_set_cookie", dmt);
	ok = dm_task_run(dmt);
	dm_udev_wait(cookie);
	return ok;
}

/* Task.info(): what libdm reads to build a DeviceInfo. */
static void read_info(struct dm_task *dmt)
{
	struct dm_info info;
	volatile const char *name, *uuid;

	if (dm_task_get_info(dmt, &info) && info.exists) {
		name = dm_task_get_name(dmt);
		uuid = dm_task_get_uuid(dmt);
		(void)name;
		(void)uuid;
	}
}

/* Task.targets(): walk every table or status line. */
static void read_targets(struct dm_task *dmt)
{
	uint64_t start, length;
	char *type, *params;
	void *next = NULL;

	do
		next = dm_get_next_target(dmt, next, &start, &length, &type, &params);
	while (next);
}

/* libdm.create(name, [Target(0, 100, "zero")]) */
static void create(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_CREATE, name);

	if (!dm_task_run(dmt))
		fail("create", dmt);
	dm_task_destroy(dmt);

	dmt = task(DM_DEVICE_RELOAD, name);
	if (!dm_task_add_target(dmt, 0, 100, "zero", ""))
		fail("dm_task_add_target", dmt);
	if (!dm_task_run(dmt))
		fail("reload", dmt);
	dm_task_destroy(dmt);

	dmt = task(DM_DEVICE_RESUME, name);
	if (!run_udev(dmt))
		fail("resume", dmt);
	read_info(dmt);
	dm_task_destroy(dmt);
}

/* libdm.remove(name) */
static void remove_dev(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_REMOVE, name);

	if (!run_udev(dmt))
		fail("remove", dmt);
	dm_task_destroy(dmt);
}

/* libdm.suspend(name) */
static void suspend(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_SUSPEND, name);

	if (!dm_task_run(dmt))
		fail("suspend", dmt);
	dm_task_destroy(dmt);
}

/* libdm.resume(name) */
static void resume(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_RESUME, name);

	if (!run_udev(dmt))
		fail("resume", dmt);
	read_info(dmt);
	dm_task_destroy(dmt);
}

/* libdm.status(name) */
static void status(const char *name)
{
	struct dm_task *dmt = task(DM_DEVICE_STATUS, name);

	if (!dm_task_run(dmt))
		fail("status", dmt);
	read_targets(dmt);
	dm_task_destroy(dmt);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* n create+remove pairs of NAME; returns elapsed seconds. */
static double pairs(const char *name, long n)
{
	double began = now();
	long i;

	for (i = 0; i < n; i++) {
		create(name);
		remove_dev(name);
	}
	return now() - began;
}

/* n suspend+resume+status cycles of the existing NAME; elapsed seconds. */
static double cycles(const char *name, long n)
{
	double began = now();
	long i;

	for (i = 0; i < n; i++) {
		suspend(name);
		resume(name);
		status(name);
	}
	return now() - began;
}

static void report(const char *mode, long n, double seconds)
{
	printf("{\"mode\": \"%s\", \"n\": %ld, \"seconds\": %.6f}\n",
	       mode, n, seconds);
	fflush(stdout);
}

static int serve(void)
{
	char line[256], mode[16], name[128];
	long n;

	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "%15s %127s %ld", mode, name, &n) != 3 || n < 1) {
			fprintf(stderr, "dm_ops: bad request: %s", line);
			return 2;
		}
		if (!strcmp(mode, "pairs"))
			report(mode, n, pairs(name, n));
		else if (!strcmp(mode, "cycles"))
			report(mode, n, cycles(name, n));
		else {
			fprintf(stderr, "dm_ops: unknown mode %s\n", mode);
			return 2;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode, *name;
	long n, warmup = 0;
	double seconds;

	/* The first task opens the control device and checks the driver
	 * version; libdm has done that before its timed loop, so do it here. */
	dm_task_destroy(task(DM_DEVICE_VERSION, NULL));
	if (argc == 2 && !strcmp(argv[1], "serve"))
		return serve();

	if (argc < 4 || argc > 5 || (n = atol(argv[3])) < 1 ||
	    (argc == 5 && (warmup = atol(argv[4])) < 0) ||
	    (strcmp(argv[1], "pairs") && strcmp(argv[1], "cycles"))) {
		fprintf(stderr, "usage: dm_ops pairs|cycles NAME N [WARMUP] | dm_ops serve\n");
		return 2;
	}
	mode = argv[1];
	name = argv[2];

	if (!strcmp(mode, "pairs")) {
		if (warmup)
			pairs(name, warmup);
		seconds = pairs(name, n);
	} else {
		create(name);
		if (warmup)
			cycles(name, warmup);
		seconds = cycles(name, n);
		remove_dev(name);
	}
	report(mode, n, seconds);
	return 0;
}
