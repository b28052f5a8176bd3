/* The library lock (a recursive pthread mutex in build_ffi.py's shim). */

void libdm_lock_init(void);
void libdm_lock(void);
void libdm_unlock(void);
