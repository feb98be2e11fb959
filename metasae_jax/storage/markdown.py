"""Foreign text in the Markdown pages we write (LLM replies, paths, names from manifests): shown, never rendered.

An explanation an LLM wrote may hold `<script>`, `onerror=`, `[x](javascript:...)` or a table's `|`; in a
report it must read as those characters. `text` escapes for running text (HTML characters as entities,
Markdown punctuation with backslashes, line breaks as spaces); `code` makes an inline code span whose fence
no backtick in the text can close.
"""

import re

_MARKDOWN = re.compile(r"([\\`*_\[\]|~#!])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def text(value) -> str:
  """`value` as plain running text of a Markdown page."""
  out = " ".join(str(value).split())
  out = "".join(_HTML.get(c, c) for c in out)
  return _MARKDOWN.sub(r"\\\1", out)


def code(value) -> str:
  """`value` as an inline code span (CommonMark: a fence longer than any run of backticks inside)."""
  out = " ".join(str(value).split())
  fence = "`" * (max((len(run) for run in re.findall(r"`+", out)), default=0) + 1)
  pad = " " if out.startswith("`") or out.endswith("`") else ""
  return f"{fence}{pad}{out}{pad}{fence}"
