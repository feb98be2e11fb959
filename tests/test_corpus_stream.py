"""Corpus reading streams: the first contexts of a corpus with one huge line or document come after reading and
tokenising at most a few MB, no text is lost or repeated, and ordinary files keep their line-end pieces."""

import builtins
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from metasae_jax.lm import corpus, export
from metasae_jax.storage import store
from tests.test_export import model_dir  # noqa: F401  (fixture: the tiny local model)

MB = 1 << 20
WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran")


def _words(num_chars: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  out = " ".join(rng.choice(WORDS, size=num_chars // 3 + 1))
  return out[:num_chars]


class _Counting:
  """Wraps the corpus module's `open` to count the characters read so far."""

  def __init__(self):
    self.read = 0

  def __call__(self, *args, **kwargs):
    f = builtins.open(*args, **kwargs)
    outer = self
    readline, read = f.readline, f.read

    def counted(fn):
      def call(*a, **k):
        out = fn(*a, **k)
        outer.read += len(out)
        return out
      return call
    f.readline, f.read = counted(readline), counted(read)
    return f


class _Recording:
  """A tokenizer that records the longest text it was asked to tokenise."""

  def __init__(self, tok):
    self.tok, self.longest = tok, 0
    self.eos_token_id, self.bos_token_id = tok.eos_token_id, tok.bos_token_id

  def __call__(self, texts, **kwargs):
    self.longest = max([self.longest] + [len(t) for t in texts])
    return self.tok(texts, **kwargs)


@pytest.fixture(scope="module")
def long_line(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "one_line.txt"
  path.write_text(_words(12 * MB))  # one 12 MB line, no newline at all
  return str(path)


def test_a_huge_single_line_streams_without_losing_text(long_line, monkeypatch):
  counting = _Counting()
  monkeypatch.setattr(corpus, "open", counting, raising=False)
  pieces = corpus.pieces(long_line)
  first, ends = next(pieces)
  assert not ends and len(first) <= 2 * corpus._TXT_PIECE_CHARS
  assert counting.read <= 3 * MB  # the first piece after reading a few MB, not the whole 12 MB line
  rest = [first] + [text for text, _ in pieces]
  with open(long_line) as f:
    assert "".join(rest) == f.read()  # nothing lost, nothing repeated
  assert all(p.endswith(" ") for p in rest[:-1])  # cut after whitespace: words stay whole


def test_first_contexts_tokenise_at_most_a_few_mb(long_line, model_dir):  # noqa: F811
  tok = _Recording(AutoTokenizer.from_pretrained(model_dir))
  first = next(corpus.contexts(long_line, tok, 8))
  assert first.shape == (8,) and tok.longest <= 2 * corpus._TXT_PIECE_CHARS


def test_a_huge_jsonl_document_is_tokenised_in_pieces(tmp_path, model_dir):  # noqa: F811
  path = tmp_path / "docs.jsonl"
  big = _words(10 * MB, seed=1)
  path.write_text(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": big}) + "\n")
  pieces = list(corpus.pieces(str(path)))
  assert pieces[0] == ("short one", True) and pieces[-1][1]
  assert "".join(t for t, _ in pieces[1:]) == big and max(len(t) for t, _ in pieces) <= corpus._MAX_PIECE_CHARS
  assert all(not ends for _, ends in pieces[1:-1])  # one document: the separator only after its last piece


def test_ordinary_lines_keep_their_line_end_pieces(tmp_path):
  lines = [_words(int(n), seed=i) + "\n" for i, n in enumerate(np.random.default_rng(2).integers(1, 90_000, 60))]
  path = tmp_path / "lines.txt"
  path.write_text("".join(lines))
  pieces = list(corpus.pieces(str(path)))
  assert "".join(t for t, _ in pieces) == "".join(lines)
  # Cut only at line ends, once a piece has reached the piece size (the old rule, so old stores resume the same).
  assert len(pieces) > 1 and all(t.endswith("\n") and len(t) >= corpus._TXT_PIECE_CHARS for t, _ in pieces[:-1])


def test_exporter_writes_its_first_shard_from_a_huge_line(long_line, model_dir, tmp_path):  # noqa: F811
  out = str(tmp_path / "acts")
  export.export_activations(export.ExportConfig(out_dir=out, model=model_dir, layer=1, corpus=long_line,
                                                context_len=8, num_tokens=64, chunk_tokens=32, progress=False,
                                                heldout_fraction=0.0))
  s = store.open_store(out)
  assert s.num_tokens == 64 and s.num_chunks == 2
