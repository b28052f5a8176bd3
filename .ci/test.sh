#!/usr/bin/env bash
# The whole test suite against libdm as a user installs it: build the sdist
# from this tree, a wheel from that sdist (python -m build does both, in
# that order), install the wheel with its test, docs and containerd extras
# into a fresh virtualenv, and run the suite with that virtualenv's Python,
# with coverage of the installed package.
#
# The suite runs from an empty working directory, with python -P: neither
# the interpreter nor any `python -m ...` child a test starts (they inherit
# the working directory) can then import libdm from the source tree.  The
# test kernel's inner pytest runs with the same interpreter, flags and
# working directory (see libdm/testing/pytest_plugin.py), and
# tests/test_installed.py fails if libdm came from anywhere but the wheel.
#
# Needs .ci/setup.sh first (system packages, .venv with `build`).  Extra
# arguments go to pytest; paths in them are taken relative to the
# repository, e.g.  bash .ci/test.sh -k harness tests/test_packaging.py
# pytest's exit status is the script's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd -P)
python=${PYTHON:-python3}

# Everything this script makes is in one directory of its own, removed at
# the end; it must be visible inside the test kernel (not under /run).
work=$(mktemp -d "${LIBDM_CI_TMP:-/var/tmp}/libdm-ci.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "test: building the sdist, then a wheel from it"
"$repo/.venv/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  echo "test: python -m build failed" >&2
  exit 1
}
sdists=("$work"/dist/libdm-*.tar.gz)
wheels=("$work"/dist/libdm-*.whl)
if [ ${#sdists[@]} -ne 1 ] || [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "test: expected one sdist and one wheel in $work/dist" >&2
  exit 1
fi
wheel=${wheels[0]}
echo "test: $(basename "${sdists[0]}"), $(basename "$wheel")"

"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install -q --upgrade pip
"$venv_python" -m pip install -q "$wheel[test,docs,containerd,containerd-dev]"

# Paths among the arguments are the repository's; with none, the whole suite.
args=()
paths=0
for arg in "$@"; do
  if [[ $arg != -* && $arg != /* && -e "$repo/${arg%%::*}" ]]; then
    args+=("$repo/$arg")
    paths=1
  else
    args+=("$arg")
  fi
done
[ $paths -eq 1 ] || args+=("$repo/tests")

mkdir "$work/run"
cd "$work/run"
# LIBDM_TEST_INSTALLED names the wheel; tests/test_installed.py and
# tests/test_packaging.py read it (the latter checks this build's sdist
# and wheel rather than building them again).
export LIBDM_TEST_INSTALLED=$wheel
# The session's test kernels (one per CPU) share the kernel tests, a module
# at a time: an hour before one is killed leaves room for a busy machine
# (the plugin's default is 30 minutes).  Arguments given later override it.
status=0
"$venv_python" -P -m pytest -c "$repo/pyproject.toml" --rootdir="$repo" \
  --cov --cov-config="$repo/pyproject.toml" --dm-kernel-timeout=3600 "${args[@]}" || status=$?
exit $status
