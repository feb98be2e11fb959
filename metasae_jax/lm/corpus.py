"""Text corpora for activation export, tokenised and packed into fixed-length contexts.

Legend: C = context length (tokens).
A corpus is `builtin` (CPython's own documentation, always offline), a
.txt/.jsonl/.parquet file or a directory of them, or an HF dataset id (needs
the `datasets` package and internet). Every order here is deterministic, so
the k-th context is the same on every run: the exporter resumes by skipping.
"""

import ast
import importlib
import importlib.util
import itertools
import json
import os
import sys
import sysconfig
from typing import Any, Iterator, Optional

import numpy as np

from metasae_jax.core.errors import UserError

BUILTIN = "builtin"
EXTENSIONS = (".txt", ".jsonl", ".parquet")
# Tokenise up to this many documents / characters per tokenizer call (fast tokenizers batch in
# Rust); the character cap keeps the first contexts quick to get when documents are long.
_DOCS_PER_CALL = 64
_CHARS_PER_CALL = 1 << 16
# Big .txt files are read and tokenised in pieces of about this many characters, cut at line ends (a longer
# line after its last whitespace before the limit).
_TXT_PIECE_CHARS = 1 << 20
# A document (jsonl row, parquet cell, dataset row) longer than this is tokenised in pieces of _TXT_PIECE_CHARS,
# so the first contexts never wait for one huge text to be tokenised whole.
_MAX_PIECE_CHARS = 4 * _TXT_PIECE_CHARS

# A piece of text and whether it ends its document (a separator token follows it).
Piece = tuple[str, bool]


def describe(corpus: str) -> str:
  """The corpus as recorded in a store manifest: `builtin`, an absolute path or a dataset id."""
  if corpus != BUILTIN and os.path.exists(corpus):
    return os.path.abspath(corpus)
  return corpus


def _builtin_pieces() -> Iterator[Piece]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  for key in sorted(topics):
    yield topics[key], True
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in sorted(sys.stdlib_module_names):
    if name.startswith("_"):
      continue
    doc = _module_docstring(stdlib, name)
    if doc:
      yield doc, True
  # Then the docstrings of each pure-Python module's public classes and functions, after every
  # module docstring, so that stores exported before this part existed keep their contexts.
  for name in sorted(sys.stdlib_module_names):
    if not name.startswith("_"):
      yield from _member_docstrings(stdlib, name)


def _module_docstring(stdlib: str, name: str) -> str:
  # Pure-Python modules are parsed, not imported: importing e.g. `antigravity` opens a browser.
  for path in (os.path.join(stdlib, name + ".py"), os.path.join(stdlib, name, "__init__.py")):
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          return ast.get_docstring(ast.parse(f.read())) or ""
      except (SyntaxError, UnicodeDecodeError, OSError):
        return ""
  # Modules written in C (math, itertools, ...) have no source; importing them is side-effect free.
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return ""
  if spec is None or spec.origin is None or spec.origin.endswith(".py"):
    return ""
  try:
    return getattr(importlib.import_module(name), "__doc__", None) or ""
  except ImportError:
    return ""


def _member_docstrings(stdlib: str, name: str) -> Iterator[Piece]:
  """One piece per module: its public classes' and functions' docstrings in source order."""
  for path in (os.path.join(stdlib, name + ".py"), os.path.join(stdlib, name, "__init__.py")):
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, OSError):
        return
      docs = []
      for node in ast.walk(tree):
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("_")):
          doc = ast.get_docstring(node)
          if doc:
            docs.append((node.lineno, f"{node.name}: {doc}"))
      if docs:
        yield "\n\n".join(doc for _, doc in sorted(docs)), True
      return


def _space_cut(text: str, limit: int) -> int:
  """Where to cut `text` at or before `limit`: just after its last whitespace there (words stay whole), else at
  `limit`."""
  i = max(text.rfind(c, 0, limit) for c in " \n\t")
  return i + 1 if i > 0 else limit


def _txt_pieces(path: str) -> Iterator[Piece]:
  with open(path, encoding="utf-8", errors="replace") as f:
    buf: list[str] = []
    size = 0
    carry = ""
    # readline(limit): a line longer than a piece arrives in parts, so reading never waits for a whole line.
    for part in iter(lambda: f.readline(_TXT_PIECE_CHARS), ""):
      part, carry = carry + part, ""
      if not part.endswith("\n") and len(part) >= _TXT_PIECE_CHARS:  # inside an over-long line
        cut = _space_cut(part, len(part))
        part, carry = part[:cut], part[cut:]
      buf.append(part)
      size += len(part)
      if size >= _TXT_PIECE_CHARS:
        yield "".join(buf), False
        buf, size = [], 0
    yield "".join(buf) + carry, True


def _split_long(texts: Iterator[Piece]) -> Iterator[Piece]:
  """The pieces, with any longer than _MAX_PIECE_CHARS cut into pieces of about _TXT_PIECE_CHARS."""
  for text, ends in texts:
    while len(text) > _MAX_PIECE_CHARS:
      cut = _space_cut(text, _TXT_PIECE_CHARS)
      yield text[:cut], False
      text = text[cut:]
    yield text, ends


def _jsonl_pieces(path: str, text_field: str) -> Iterator[Piece]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"--corpus {path}: line {lineno} is not valid JSON ({e}). Fix the file; "
                        "a .jsonl corpus holds one JSON object per line.") from e
      yield _field(row, text_field, f"{path} line {lineno}"), True


def _field(row: Any, text_field: str, where: str) -> str:
  if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise UserError(f"--corpus {where}: no string field {text_field!r} (has {keys}). Pass "
                    "--text_field naming the field that holds the text.")
  return row[text_field]


def _require_pyarrow(path: str) -> None:
  if importlib.util.find_spec("pyarrow") is None:
    raise UserError(f"--corpus {path}: reading .parquet needs pyarrow, which is not installed. "
                    "Run `pip install pyarrow` or convert the corpus to .jsonl or .txt.")


def _parquet_pieces(path: str, text_field: str) -> Iterator[Piece]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pfile = pq.ParquetFile(path)
  if text_field not in pfile.schema_arrow.names:
    raise UserError(f"--corpus {path}: no column {text_field!r} (has {pfile.schema_arrow.names}). "
                    "Pass --text_field naming the text column.")
  for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
    for text in batch.column(0).to_pylist():
      if text:
        yield str(text), True


def _file_pieces(path: str, text_field: str) -> Iterator[Piece]:
  if path.endswith(".txt"):
    return _txt_pieces(path)
  if path.endswith(".jsonl"):
    return _jsonl_pieces(path, text_field)
  if path.endswith(".parquet"):
    _require_pyarrow(path)
    return _parquet_pieces(path, text_field)
  raise UserError(f"--corpus {path}: unsupported file type. Pass a {'/'.join(EXTENSIONS)} file, "
                  f"a directory of them, {BUILTIN!r}, or an HF dataset id.")


def _dir_files(path: str) -> list[str]:
  files = []
  for root, dirs, names in os.walk(path):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(EXTENSIONS))
  if not files:
    raise UserError(f"--corpus {path}: the directory holds no {'/'.join(EXTENSIONS)} files. "
                    "Point --corpus at a directory or file with text.")
  return files


def _dataset_pieces(name: str, text_field: str) -> Iterator[Piece]:
  if importlib.util.find_spec("datasets") is None:
    raise UserError(f"--corpus {name!r} is not {BUILTIN!r} nor an existing file or directory, and "
                    "the `datasets` package needed for HF dataset ids is not installed. Pass "
                    f"--corpus {BUILTIN}, a .txt/.jsonl/.parquet path, or `pip install datasets`.")
  return _dataset_rows(name, text_field)


def _dataset_rows(name: str, text_field: str) -> Iterator[Piece]:
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    # "org/dataset:config" selects a named configuration, e.g. HuggingFaceFW/fineweb:sample-10BT.
    path, _, config = name.partition(":")
    rows = datasets.load_dataset(path, config or None, split="train", streaming=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--corpus {name!r}: cannot load it as an HF dataset ({e}). Check the id and "
                    f"internet access, or pass --corpus {BUILTIN} or a local file.") from e
  for i, row in enumerate(rows):
    yield _field(row, text_field, f"{name} row {i}"), True


def pieces(corpus: str, text_field: str = "text") -> Iterator[Piece]:
  """The corpus's text in a deterministic order, as (text, ends_document) pieces.

  Checks the corpus now (missing file, missing package), reads it lazily and in bounded pieces: the first
  pieces arrive after reading at most a few MB, whatever the line or document length.
  """
  return _split_long(_source_pieces(corpus, text_field))


def _source_pieces(corpus: str, text_field: str) -> Iterator[Piece]:
  if corpus == BUILTIN:
    return _builtin_pieces()
  if os.path.isdir(corpus):
    files = _dir_files(corpus)
    for path in files:
      if path.endswith(".parquet"):
        _require_pyarrow(path)
    return itertools.chain.from_iterable(_file_pieces(p, text_field) for p in files)
  if os.path.isfile(corpus):
    return _file_pieces(corpus, text_field)
  if corpus.endswith(EXTENSIONS) or corpus.startswith(("/", ".", "~")):
    raise UserError(f"--corpus {corpus}: no such file or directory. Pass an existing path, "
                    f"{BUILTIN!r}, or an HF dataset id.")
  return _dataset_pieces(corpus, text_field)


def token_bound(corpus: str) -> Optional[int]:
  """An upper bound on the tokens a local .txt/.jsonl corpus yields, from file sizes alone (no tokenizer), or
  None when sizes say nothing (builtin, parquet, a dataset id).

  No tokenizer makes more than one token of a byte, plus a word-prefix token and a separator per document; a
  .jsonl row spends more bytes on its JSON than those two tokens.
  """
  if corpus == BUILTIN:
    return None
  files = _dir_files(corpus) if os.path.isdir(corpus) else [corpus] if os.path.isfile(corpus) else []
  if not files or any(not path.endswith((".txt", ".jsonl")) for path in files):
    return None
  return sum(os.path.getsize(path) + (2 if path.endswith(".txt") else 0) for path in files)


def separator_id(tokenizer: Any):
  """The token put between documents: EOS, else BOS, else none."""
  for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
    if tid is not None:
      return int(tid)
  return None


def _token_runs(texts: Iterator[Piece], tokenizer: Any) -> Iterator[list[int]]:
  sep = separator_id(tokenizer)
  batch: list[Piece] = []

  def flush():
    ids = tokenizer([t for t, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
    for (_, ends), run in zip(batch, ids):
      yield list(run) + ([sep] if ends and sep is not None else [])

  chars = 0
  for piece in texts:
    batch.append(piece)
    chars += len(piece[0])
    if len(batch) == _DOCS_PER_CALL or chars >= _CHARS_PER_CALL:
      yield from flush()
      batch, chars = [], 0
  if batch:
    yield from flush()


def pack(texts: Iterator[Piece], tokenizer: Any, context_len: int) -> Iterator[np.ndarray]:
  """Concatenates the tokenised pieces and cuts them into int32 contexts [C]; drops the tail."""
  buf = np.empty(0, dtype=np.int32)
  for run in _token_runs(texts, tokenizer):
    buf = np.concatenate([buf, np.asarray(run, dtype=np.int32)])
    n = len(buf) // context_len
    for i in range(n):
      yield buf[i * context_len:(i + 1) * context_len]
    buf = buf[n * context_len:]


def contexts(corpus: str, tokenizer: Any, context_len: int,
             text_field: str = "text") -> Iterator[np.ndarray]:
  """Deterministic int32 token contexts [C] of `corpus`."""
  if context_len <= 0:
    raise UserError(f"--context_len {context_len} must be positive.")
  return pack(pieces(corpus, text_field), tokenizer, context_len)
