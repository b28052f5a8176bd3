"""Sphinx extension: the ``libdm`` command's reference, from its parser.

``.. libdm-cli::`` renders ``libdm --help`` and then, for every command in
the order the parser declares them, a section titled ``libdm <command>``
holding that command's ``--help`` as a literal block.  The text comes from
the same argparse parser the command uses, so the reference cannot drift
from the program.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

if TYPE_CHECKING:
    from sphinx.application import Sphinx
    from sphinx.util.typing import ExtensionMetadata, OptionSpec

#: The help text's width in the rendered page.
WIDTH = 78


def _literal(text: str) -> list[str]:
    return ["::", ""] + ["   " + line if line else "" for line in text.splitlines()] + [""]


def reference_lines(underline: str = "~") -> list[str]:
    """The reference as reStructuredText lines."""
    from libdm.cli.parser import build_parser

    parser = build_parser(width=WIDTH)
    lines = _literal(parser.format_help())
    for name, sub in parser.commands.items():
        title = f"libdm {name}"
        lines += [title, underline * len(title), "", *_literal(sub.format_help())]
    return lines


class LibdmCli(SphinxDirective):
    """``.. libdm-cli::`` (no arguments): the generated command reference."""

    has_content = False
    option_spec: ClassVar[OptionSpec] = {}

    def run(self) -> list[nodes.Node]:
        import libdm.cli

        # Rebuild the page when the command's source changes.
        package = os.path.dirname(libdm.cli.__file__)
        for name in sorted(os.listdir(package)):
            if name.endswith(".py"):
                self.env.note_dependency(os.path.join(package, name))
        holder = nodes.section()
        holder.document = self.state.document
        content = StringList(reference_lines(), source=self.get_source_info()[0])
        nested_parse_with_titles(self.state, content, holder)
        parsed: list[nodes.Node] = holder.children
        return parsed


def setup(app: Sphinx) -> ExtensionMetadata:
    app.add_directive("libdm-cli", LibdmCli)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
