from setuptools import find_packages, setup

setup(
    name="libdm",
    version="0.1.0",
    description="A Python library for the Linux device-mapper: a cffi binding to "
    "libdevmapper with a thin-pool object model.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="LGPL-2.1-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["libdm", "libdm.*"]),
    package_data={"libdm": ["_decl/*.h", "testing/*.c", "testing/boot/*.py"]},
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15"],
    cffi_modules=["build_ffi.py:ffibuilder"],
    entry_points={"console_scripts": ["libdm=libdm.cli:main"]},
    extras_require={
        "test": ["pytest>=7", "pytest-cov>=4", "hypothesis>=6"],
        "docs": ["sphinx>=7"],
        # The containerd snapshotter plugin (libdm.snapshotter).  protobuf is
        # at least the version that compiled libdm/snapshotter/api/*_pb2.py;
        # grpcio-tools regenerates them (tests/test_snapshotter_api.py).
        "containerd": ["grpcio>=1.59", "protobuf>=7.35.1"],
        "containerd-dev": ["grpcio-tools>=1.85.1"],
    },
    zip_safe=False,
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Filesystems",
    ],
)
