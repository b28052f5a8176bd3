/* Make User-Mode Linux run on hosts whose XSAVE area is larger than the
 * one UML was built for (AVX-512, AMX).  The host kernel accepts
 * PTRACE_SETREGSET(NT_X86_XSTATE) only with a buffer of its full XSAVE
 * size; UML passes its own, smaller one.  Preloaded into the UML binary,
 * this pads such a call to the host's size, with the components that do
 * not fit in UML's buffer marked as in their initial state.  Reads are
 * allowed to be short and pass through unchanged. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define XSAVE_HDR_OFFSET 512
#define MAX_XSAVE 65536

static __thread unsigned char padded[MAX_XSAVE] __attribute__((aligned(64)));
static size_t host_size;

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace(void)
{
	static ptrace_fn fn;
	if (!fn)
		fn = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	return fn;
}

/* Clear the xstate_bv bits of components that end past `len` bytes. */
static void drop_components_beyond(unsigned char *buf, size_t len)
{
	uint64_t bv;
	memcpy(&bv, buf + XSAVE_HDR_OFFSET, sizeof bv);
	for (unsigned i = 2; i < 64; i++) {
		unsigned eax, ebx, ecx, edx;
		if (!(bv & (1ULL << i)))
			continue;
		__cpuid_count(0xd, i, eax, ebx, ecx, edx);
		if ((size_t)ebx + eax > len)
			bv &= ~(1ULL << i);
	}
	memcpy(buf + XSAVE_HDR_OFFSET, &bv, sizeof bv);
}

long ptrace(enum __ptrace_request request, ...)
{
	va_list ap;
	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);

	if (request == PTRACE_SETREGSET && (uintptr_t)addr == NT_X86_XSTATE && data) {
		struct iovec *iov = data;
		if (!host_size) {
			struct iovec probe = { padded, sizeof padded };
			if (real_ptrace()(PTRACE_GETREGSET, pid, addr, &probe) == 0)
				host_size = probe.iov_len;
		}
		if (host_size > iov->iov_len && host_size <= sizeof padded
		    && iov->iov_len > XSAVE_HDR_OFFSET + 8) {
			memset(padded + iov->iov_len, 0, host_size - iov->iov_len);
			memcpy(padded, iov->iov_base, iov->iov_len);
			drop_components_beyond(padded, iov->iov_len);
			struct iovec full = { padded, host_size };
			return real_ptrace()(request, pid, addr, &full);
		}
	}
	return real_ptrace()(request, pid, addr, data);
}
