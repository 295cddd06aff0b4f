# -*- test-case-name: tests.cli.test_shell -*-
"""
C{imgresume man}: the manual page imgresume(1), in roff, made from the
options classes of every command (their synopses, descriptions, options and
defaults), so it says what C{--help} says.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import imgresume
from imgresume._options import EXIT_OK, BaseOptions
from imgresume.cli._completion import command_tree, options_of


class ManOptions(BaseOptions):
    synopsis = ""
    longdesc = """Print the manual page imgresume(1), in roff, made from the commands'
options.  Read it, or install it:
  imgresume man | man -l -
  imgresume man > ~/.local/share/man/man1/imgresume.1
  imgresume man | gzip > /usr/local/share/man/man1/imgresume.1.gz"""


def _escape(text: str) -> str:
    """C{text} safe in roff: backslashes, hyphens, and a dot or quote opening a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"(?m)^([.'])", r"\\&\1", text)


def _paragraphs(text: str) -> list[str]:
    """A long description as roff: prose reflowed, indented blocks kept as they are."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if len(lines) > 1 and all(l.startswith("  ") for l in lines[1:]) \
                and not lines[0].startswith("  "):
            # "Examples:" and its indented lines
            out += [".PP", _escape(lines[0]), ".RS", ".nf",
                    *(_escape(l[2:]) for l in lines[1:]), ".fi", ".RE"]
        elif any(l.startswith("  ") for l in lines):
            out += [".PP", ".nf", *(_escape(l) for l in lines), ".fi"]
        else:
            out += [".PP", _escape(" ".join(l.strip() for l in lines))]
    return out


def man_page() -> str:
    """The manual page, in roff."""
    tree = list(command_tree())
    top = tree[0].options
    out = [
        f'.TH IMGRESUME 1 "" "imgresume {imgresume.__version__}" "User Commands"',
        ".SH NAME",
        "imgresume \\- resumable upload of large image files to a pool of servers",
        ".SH SYNOPSIS",
        ".B imgresume",
        ".I COMMAND",
        "[\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        *_paragraphs(top.longdesc),
        ".SH COMMANDS",
    ]
    for command in tree:
        options = command.options
        if not command.words:
            continue
        usage_line = " ".join(("imgresume", *command.words, getattr(options, "synopsis", "")))
        out += [f'.SS "{_escape(usage_line.strip())}"', _escape(command.summary)]
        out += _paragraphs(getattr(options, "longdesc", "") or "")
        listed = [o for o in options_of(options) if o.name not in ("help", "version")]
        if listed:
            out += [".PP", "Options:"]
        for option in listed:
            names = ([f"\\fB\\-{option.short}\\fR"] if option.short else []) \
                + [f"\\fB\\-\\-{_escape(option.name)}\\fR"]
            head = ", ".join(names)
            if option.takes_value:
                head += f"=\\fI{_escape(option.name.upper())}\\fR"
            doc = option.doc
            if option.takes_value and option.default is not None:
                doc += f" [default: {option.default}]"
            out += [".TP", head, _escape(doc)]
    out += [
        ".SH OPTIONS",
        "Every command takes \\fB\\-\\-help\\fR (its usage) and \\fB\\-\\-version\\fR.",
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBIMGRESUME_TO\\fR, \\fBIMGRESUME_KEY_FILE\\fR, \\fBIMGRESUME_PARALLEL\\fR, ...",
        "The defaults of \\fBimgresume upload\\fR's options (see \\fBimgresume config\\fR);"
        " a flag wins over the variable.",
        ".TP",
        "\\fBXDG_CONFIG_HOME\\fR, \\fBXDG_STATE_HOME\\fR",
        "Where the config file and the journal are.",
        ".SH FILES",
        ".TP",
        "\\fI$XDG_CONFIG_HOME/imgresume/config.toml\\fR (\\fI~/.config/imgresume/config.toml\\fR)",
        "The upload settings, in an [upload] table; the variables win over it.",
        ".TP",
        "\\fI$XDG_STATE_HOME/imgresume/journal.json\\fR",
        "The journal of unfinished and finished uploads.",
        ".SH SEE ALSO",
        "\\fBtwistd\\fR(1): the servers run as \\fBtwistd imgresume\\fR, the balancer as"
        " \\fBtwistd imgresume\\-lb\\fR.  The documentation in the source tree's docs/.",
        "",
    ]
    return "\n".join(out)


def run_man(config: ManOptions, out: Any = None) -> int:
    """C{imgresume man}: print the page; the exit code."""
    (out or sys.stdout).write(man_page())
    return EXIT_OK
