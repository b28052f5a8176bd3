/* Task types and result structures (libdevmapper.h, first section). */

enum {
    DM_DEVICE_CREATE,
    DM_DEVICE_RELOAD,
    DM_DEVICE_REMOVE,
    DM_DEVICE_REMOVE_ALL,
    DM_DEVICE_SUSPEND,
    DM_DEVICE_RESUME,
    DM_DEVICE_INFO,
    DM_DEVICE_DEPS,
    DM_DEVICE_RENAME,
    DM_DEVICE_VERSION,
    DM_DEVICE_STATUS,
    DM_DEVICE_TABLE,
    DM_DEVICE_WAITEVENT,
    DM_DEVICE_LIST,
    DM_DEVICE_CLEAR,
    DM_DEVICE_MKNODES,
    DM_DEVICE_LIST_VERSIONS,
    DM_DEVICE_TARGET_MSG,
    DM_DEVICE_SET_GEOMETRY,
    DM_DEVICE_ARM_POLL,
    DM_DEVICE_GET_TARGET_VERSION,
    ...
};

struct dm_task;

struct dm_info {
    int exists;
    int suspended;
    int live_table;
    int inactive_table;
    int32_t open_count;
    uint32_t event_nr;
    uint32_t major;
    uint32_t minor;
    int read_only;
    int32_t target_count;
    int deferred_remove;
    int internal_suspend;
    ...;
};

struct dm_deps {
    uint32_t count;
    uint32_t filler;
    uint64_t device[];
};

struct dm_names {
    uint64_t dev;
    uint32_t next;
    char name[];
};

struct dm_versions {
    uint32_t next;
    uint32_t version[3];
    char name[];
};

typedef enum dm_add_node_e {
    DM_ADD_NODE_ON_RESUME,
    DM_ADD_NODE_ON_CREATE
} dm_add_node_t;

#define DM_NAME_LEN ...
#define DM_UUID_LEN ...
#define DM_MAX_TYPE_NAME ...
