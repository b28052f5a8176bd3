"""The snapshotter's message modules are what grpcio-tools compiles from
libdm/snapshotter/api/*.proto, and the gRPC dependency stays in its
package."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join("libdm", "snapshotter", "api")


def test_generated_modules_match_the_proto_files(tmp_path):
    # grpcio-tools comes with the containerd-dev extra (.ci/setup.sh installs it).
    from grpc_tools import protoc  # noqa: F401

    protos = sorted(f for f in os.listdir(os.path.join(ROOT, API)) if f.endswith(".proto"))
    assert protos == ["mount.proto", "snapshots.proto"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *[os.path.join(API, p) for p in protos],
        ],
        cwd=ROOT,
        check=True,
    )
    for module in [p.replace(".proto", ext) for p in protos for ext in ("_pb2.py", "_pb2.pyi")]:
        with (
            open(os.path.join(tmp_path, API, module)) as fresh,
            open(os.path.join(ROOT, API, module)) as committed,
        ):
            assert fresh.read() == committed.read(), (
                f"{module} is stale: regenerate with python -m grpc_tools.protoc -I. "
                f"--python_out=. --pyi_out=. {API}/*.proto"
            )


def test_import_libdm_does_not_import_grpc():
    code = (
        "import sys, libdm, libdm.cli, libdm.cli.snapshotter_cmds; libdm.Pool; "
        "assert 'grpc' not in sys.modules and 'google.protobuf' not in sys.modules"
    )
    # -P: the libdm under test, never the source tree in the working directory.
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_only_the_snapshotter_package_imports_grpc():
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "libdm")):
        if os.path.join("libdm", "snapshotter") in dirpath:
            continue
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f)) as fh:
                    text = fh.read()
                if "import grpc" in text or "google.protobuf" in text:
                    offenders.append(os.path.join(dirpath, f))
    assert offenders == []
