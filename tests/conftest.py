"""Shared test configuration: the device-mapper test harness (see
libdm/testing/pytest_plugin.py) and pytester for the harness's own tests."""

pytest_plugins = ["libdm.testing.pytest_plugin", "pytester"]
