"""Foreign text in our Markdown pages renders as exactly that text under CommonMark (raw HTML enabled, as
GitHub-like viewers allow): no tag, link, image, emphasis or table cell of its own."""

import html
import re

import pytest

from metasae_jax.evaluation import report
from metasae_jax.storage import markdown as md

markdown_it = pytest.importorskip("markdown_it")

HOSTILE = ["<script>alert(1)</script> x", "<img src=x onerror=alert(2)>", "[click](javascript:alert(3))",
           "<javascript:alert(4)>", "![img](x.png)", "a | b | c", "**b** _i_ `code` ~~s~~ # h",
           "back\\slash &amp; &lt;", "```fence", "line one\nline two\t tab", "1. not a list", "- not an item",
           "&#60;script&#62;"]


def _render(text: str) -> str:
  return markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(text)


def _visible(rendered: str, tag: str = "p") -> str:
  """The text of the one paragraph (or code span) the renderer made, entities decoded."""
  match = re.fullmatch(rf"<p>(.*)</p>\n", rendered, re.S)
  assert match, rendered
  inner = match.group(1)
  if tag == "code":
    match = re.fullmatch(r"<code>(.*)</code>", inner, re.S)
    assert match, rendered
    inner = match.group(1)
  assert "<" not in inner, rendered  # no element of the text's own
  return html.unescape(inner)


@pytest.mark.parametrize("value", HOSTILE)
def test_text_and_code_render_as_the_text_itself(value):
  flat = " ".join(value.split())
  assert _visible(_render("Seen: " + md.text(value))) == "Seen: " + flat
  assert _visible(_render(md.code(value)), "code") == flat


def test_table_cells_keep_their_pipes():
  row = "| " + " | ".join(md.text(v) for v in ("a | b", "<b>x</b>")) + " |"
  rendered = _render("| one | two |\n|---|---|\n" + row + "\n")
  cells = re.findall(r"<td>(.*?)</td>", rendered)
  assert [html.unescape(c) for c in cells] == ["a | b", "<b>x</b>"]


def test_evaluation_report_shows_foreign_paths_and_notes_as_text():
  doc = report.markdown({"run_dir": "runs/<script>alert(1)</script>", "activations": "data/`x`<img src=y>",
                         "num_tokens": 8, "firing": "threshold", "batch_size": 4, "skip": {"rule": "all positions"},
                         "joint": {}, "notes": ["source.model '[m](javascript:alert(2))' differs"], "plots": []})
  rendered = _render(doc)
  for active in ("<script", "<img", 'href="javascript'):
    assert active not in rendered
  assert "runs/&lt;script&gt;alert(1)&lt;/script&gt;" in rendered and "[m](javascript:alert(2))" in rendered
