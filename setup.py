"""The cffi build hook, which pyproject.toml cannot express: everything else
about the package (metadata, version, dependencies) is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"], zip_safe=False)
