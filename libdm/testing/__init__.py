"""Test harness for libdm: real device-mapper kernels for tests.

``libdm.testing.kernel`` boots a User-Mode Linux kernel to run a command
where the host has no device-mapper; ``libdm.testing.pytest_plugin`` runs
the ``kernel``-marked tests of a pytest session inside one such kernel;
``libdm.testing.cleanup`` removes what a test left behind;
``libdm.testing.in_ci`` tells whether the tests run under CI (where a
missing kernel or tool fails a test instead of skipping it); ``python -m
libdm.testing`` runs a command wherever device-mapper can be had.
"""

from libdm.testing.ci import in_ci
from libdm.testing.kernel import (
    KernelCrashed,
    KernelError,
    KernelResult,
    KernelTimeout,
    KernelUnavailable,
    find_kernel,
    host_has_device_mapper,
    run,
    start,
)

__all__ = [
    "KernelCrashed",
    "KernelError",
    "KernelResult",
    "KernelTimeout",
    "KernelUnavailable",
    "find_kernel",
    "host_has_device_mapper",
    "in_ci",
    "run",
    "start",
]
