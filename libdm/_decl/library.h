/* Library-wide settings and version queries. */

int dm_get_library_version(char *version, size_t size);
int dm_driver_version(char *version, size_t size);
const char *dm_dir(void);
int dm_set_dev_dir(const char *dir);
int dm_is_dm_major(uint32_t major);
void dm_hold_control_dev(int hold_open);
void dm_lib_release(void);
