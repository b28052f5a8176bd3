/* Event polling on a control fd of our own (C helper in build_ffi.py). */

int libdm_arm_poll(int fd);
