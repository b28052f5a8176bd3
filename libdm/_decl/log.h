/* Routing libdevmapper's log into Python (see the C shim in build_ffi.py). */

extern "Python" void libdm_py_log(int level, const char *file, int line,
                                  int dm_errno_or_class, const char *msg);

void libdm_log_install(int forward_level);
void libdm_log_set_level(int forward_level);
void libdm_log_restore_default(void);
