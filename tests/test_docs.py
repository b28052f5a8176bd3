"""The documentation builds cleanly and the public API documents itself.

None of this touches the kernel: Sphinx only imports libdm, and the
docstring checks only read the functions.
"""

import builtins
import inspect
import os
import re
import subprocess
import sys

import pytest

import libdm
import libdm.dm.errors
import libdm.dm.ops

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _public_api():
    """The functions and classes of ``libdm.__all__`` (not the modules and
    constants it also holds)."""
    out = {}
    for name in libdm.__all__:
        obj = getattr(libdm, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out[name] = obj
    return out


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    """Build the HTML docs once, with warnings as errors."""
    # sphinx is a test requirement (pip install .[test,docs]); its absence
    # is a failure, not a reason to skip.
    out = tmp_path_factory.mktemp("html")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", DOCS, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"sphinx-build failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return out


def test_docs_build_without_warnings(html):
    assert (html / "index.html").is_file()
    for page in (
        "install",
        "quickstart",
        "device-operations",
        "errors",
        "logging",
        "testing",
        "api",
    ):
        assert (html / f"{page}.html").is_file(), page


def test_api_page_documents_every_public_name(html):
    api = (html / "api.html").read_text(encoding="utf-8")
    missing = []
    for name, obj in _public_api().items():
        anchors = {f'id="libdm.{name}"', f'id="{obj.__module__}.{name}"'}
        if not any(anchor in api for anchor in anchors):
            missing.append(name)
    assert not missing, f"not in docs/api.rst: {missing}"


def _own_docstring(obj):
    # obj.__doc__ rather than inspect.getdoc, which would borrow a base
    # class's docstring for a class that has none.
    doc = obj.__doc__
    # A NamedTuple without a docstring gets "Name(field, ...)".
    if inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields"):  # noqa: SIM102
        if doc == f"{obj.__name__}({', '.join(obj._fields)})":
            return None
    return inspect.cleandoc(doc) if doc and doc.strip() else None


@pytest.mark.parametrize("name", sorted(_public_api()))
def test_public_name_has_docstring(name):
    obj = _public_api()[name]
    assert _own_docstring(obj), f"libdm.{name} has no docstring of its own"


def _sections(doc):
    """Google-style sections of a docstring: {"Raises": [entry, ...], ...}.

    An entry is a line at the section's base indentation together with the
    more-indented lines that continue it, the way napoleon reads them.
    """
    lines = doc.splitlines()
    sections = {}
    i = 0
    while i < len(lines):
        header = re.fullmatch(r"(\w+):", lines[i].strip())
        if not header or lines[i] != lines[i].lstrip():
            i += 1
            continue
        i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            body.append(lines[i])
            i += 1
        body = [line for line in body if line.strip()]
        entries = []
        if body:
            base = min(len(line) - len(line.lstrip()) for line in body)
            for line in body:
                if len(line) - len(line.lstrip()) == base:
                    entries.append(line.strip())
                else:
                    entries[-1] += " " + line.strip()
        sections[header.group(1)] = entries
    return sections


def _exception_class(name):
    obj = getattr(libdm.dm.errors, name, None) or getattr(builtins, name, None)
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def _raises_problems(entries):
    """What is wrong with a Raises section, as a list of strings."""
    if not entries:
        return ["an empty Raises section"]
    problems = []
    for entry in entries:
        names, colon, text = entry.partition(":")
        if not colon or not text.strip():
            problems.append(f"entry {entry!r} is not 'Exception: when it is raised'")
            continue
        for name in (n.strip() for n in names.split(",")):
            if not _exception_class(name):
                problems.append(f"entry {entry!r} names {name!r}, not an exception class")
    return problems


@pytest.mark.parametrize("name", libdm.dm.ops.__all__)
def test_ops_docstring_says_what_it_raises_or_returns(name):
    """Each device operation documents its failures in a Raises section
    (one ``Exception: when`` entry per line, each naming a real exception
    class) or, for one that cannot fail, its result in a Returns section."""
    func = getattr(libdm.dm.ops, name)
    doc = _own_docstring(func)
    assert doc, f"libdm.{name} has no docstring"
    sections = _sections(doc)
    assert "Raises" in sections or "Returns" in sections, (
        f"libdm.{name}'s docstring has neither a Raises nor a Returns section"
    )
    if "Returns" in sections:
        assert sections["Returns"], f"libdm.{name} has an empty Returns section"
    if "Raises" in sections:
        problems = _raises_problems(sections["Raises"])
        assert not problems, f"libdm.{name}'s Raises section: " + "; ".join(problems)
