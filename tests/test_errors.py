"""The exception hierarchy (no kernel)."""

import errno
import pickle

import pytest

import libdm
from libdm.dm.errors import error_for


@pytest.mark.parametrize(
    "err, cls, builtin",
    [
        (errno.ENXIO, libdm.NoSuchDeviceError, FileNotFoundError),
        (errno.ENODEV, libdm.DMError, OSError),
        (errno.EEXIST, libdm.DeviceExistsError, FileExistsError),
        (errno.EACCES, libdm.PermissionDeniedError, PermissionError),
        (errno.EPERM, libdm.PermissionDeniedError, PermissionError),
        (errno.EBUSY, libdm.DeviceBusyError, libdm.DMError),
        (errno.EINVAL, libdm.DMError, OSError),
    ],
)
def test_errno_maps_to_class_and_builtin(err, cls, builtin):
    exc = error_for(err, "remove", "vol")
    assert type(exc) is cls
    assert isinstance(exc, builtin) and isinstance(exc, libdm.DMError)
    assert exc.errno == err and exc.operation == "remove" and exc.device == "vol"


def test_message_names_operation_device_errno_and_log_lines():
    exc = error_for(errno.EBUSY, "remove", "vol", ["device-mapper: remove ioctl failed"])
    text = str(exc)
    assert text.startswith("remove on 'vol' failed: [Errno 16] Device or resource busy")
    assert "device-mapper: remove ioctl failed" in text


def test_permission_error_says_root_is_needed():
    assert "CAP_SYS_ADMIN" in str(error_for(errno.EACCES, "create", "x"))


def test_errors_pickle_with_their_fields():
    exc = error_for(errno.ENXIO, "info", "vol", ["a line"])
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is libdm.NoSuchDeviceError
    assert (copy.errno, copy.operation, copy.device, copy.log_lines) == (
        errno.ENXIO,
        "info",
        "vol",
        ("a line",),
    )


def test_library_version_needs_no_kernel():
    assert libdm.library_version().split(".")[0] == "1"
