/* Block-device and loop ioctls (linux/fs.h, linux/loop.h): the numbers and
 * struct layouts come from the kernel headers when the module is compiled,
 * so none is written by hand in Python.  "..." lets the C compiler fill in
 * each value, each field's offset and each struct's size. */

typedef int... __u8;
typedef int... __u32;
typedef int... __u64;

#define BLKGETSIZE64 ...
#define BLKDISCARD ...
#define FITRIM ...

#define LOOP_SET_FD ...
#define LOOP_CLR_FD ...
#define LOOP_SET_STATUS64 ...
#define LOOP_GET_STATUS64 ...
#define LOOP_SET_CAPACITY ...
#define LOOP_SET_DIRECT_IO ...
#define LOOP_CONFIGURE ...
#define LOOP_CTL_GET_FREE ...

#define LO_NAME_SIZE ...
#define LO_KEY_SIZE ...
#define LOOP_MAJOR ...

enum {
    LO_FLAGS_READ_ONLY,
    LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_PARTSCAN,
    LO_FLAGS_DIRECT_IO,
    ...
};

struct loop_info64 {
    __u64 lo_device;
    __u64 lo_inode;
    __u64 lo_rdevice;
    __u64 lo_offset;
    __u64 lo_sizelimit;
    __u32 lo_number;
    __u32 lo_flags;
    __u8 lo_file_name[64];
    ...;
};

struct loop_config {
    __u32 fd;
    __u32 block_size;
    struct loop_info64 info;
    ...;
};

struct fstrim_range {
    __u64 start;
    __u64 len;
    __u64 minlen;
};
