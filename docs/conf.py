"""Sphinx configuration of the tdxcore docs (``python3 -m sphinx -W -b html docs docs/_build/html``)."""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "tdxcore"
author = "the tdxcore authors"
copyright = "2026, the tdxcore authors"  # noqa: A001

try:
    import tdxcore

    release = tdxcore.__version__
except ImportError:  # pragma: no cover - the docs need the built package
    release = "0.1.0"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

# numpy-style docstrings only (STYLE §2).
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = False

# Document what each module defines (its own names), not what it re-exports: every object then has
# one canonical page and cross-references are never ambiguous.
autodoc_default_options = {
    "members": True,
    "ignore-module-all": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_class_signature = "mixed"

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_theme = "alabaster"
html_title = f"tdxcore {release}"
html_theme_options = {"description": "A hardware-free model of the Intel TDX host memory stack"}

# The model's docstrings use numpy-style sections freely; a docstring's own reST problems are real
# warnings (and -W makes them errors), but references to names that have no page are not.
nitpicky = False
suppress_warnings = ["ref.python"]


_LONE_STAR = re.compile(r"(^|[\s(])\*([A-Z][A-Z_]+)\b(?!\*)")


def _escape_lone_stars(app, what, name, obj, options, lines):
    """Escape a glob-like ``*BLOCKED`` (any *BLOCKED state) that reST would read as emphasis.

    The compiled cores' docstrings cannot be fixed without a rebuild; this keeps ``-W`` passing.
    """
    for i, line in enumerate(lines):
        lines[i] = _LONE_STAR.sub(r"\1\\*\2", line)


def setup(app):
    """Register the docstring fix-up."""
    app.connect("autodoc-process-docstring", _escape_lone_stars)
