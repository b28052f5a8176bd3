"""Sphinx configuration for libdm's documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` after
installing libdm (``pip install .[docs]``): autodoc imports the package,
including its compiled binding.
"""

import os
import sys

import libdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "libdm"
author = "the libdm authors"
copyright = "the libdm authors"
release = libdm.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "libdm_cli",
]

# Docstrings are Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

autodoc_member_order = "bysource"

exclude_patterns = ["_build"]

html_theme = "alabaster"
html_title = f"libdm {release}"
