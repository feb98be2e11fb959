"""Writes the browser as one self-contained HTML file: template + style + script + data inlined, nothing fetched."""

import json
import os

from metasae_jax.core.errors import UserError
from metasae_jax.storage import atomic

ASSETS = os.path.dirname(os.path.abspath(__file__))
PAGE = "index.html"
# In every page this module writes; an index.html without it is someone else's file and is never replaced.
GENERATOR = '<meta name="generator" content="metasae-jax browser">'


def _asset(name: str) -> str:
  with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
    return f.read()


def script_json(data: dict) -> str:
  """JSON safe inside <script>: '<', '>' and '&' escaped, so token text like '</script>' cannot end the block."""
  text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
  return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
          .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render(data: dict) -> str:
  """The page's HTML text."""
  rest, out = _asset("index.html"), []
  # Only the template is scanned for placeholders (in page order), never the inserted text.
  for placeholder, text in (("/*STYLE*/", _asset("style.css")), ("/*DATA*/", script_json(data)),
                            ("/*APP*/", _asset("app.js"))):
    head, sep, rest = rest.partition(placeholder)
    if not sep:
      raise ValueError(f"browser template {PAGE} lacks {placeholder} (after the previous placeholder)")
    out += [head, text]
  return "".join(out + [rest])

def write(data: dict, out_dir: str) -> str:
  """Writes out_dir/index.html atomically; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, PAGE)
  if os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      ours = GENERATOR in f.read(4096)
    if not ours:
      raise UserError(f"{path} exists and was not written by the browser; it is left untouched. Pick another "
                      "--out_dir (the browser replaces only its own earlier page).")
  atomic.write_text(path, render(data))
  return path
