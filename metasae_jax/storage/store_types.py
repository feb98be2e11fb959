"""The `Store` interface every reader of activations uses, whichever format and place the store has.

Legend: T = tokens, D = d_model, K = gathered rows, C = chunks, S = segments.
Global token indices run over the store (or view) in order. A *segment* is a run of tokens in which contexts
follow each other (token t of a segment sits at position t % context_len of its context); contexts never
cross a segment boundary (a format-1 shard is a segment; a zarr store is one). A *chunk* is the unit of reading:
whole contexts inside one segment, read whole and checked whole.
"""

import abc
from typing import Optional

import numpy as np

from metasae_jax.core.errors import UserError

FORMAT_NPY = "metasae-activations/1"
FORMAT_ZARR = "metasae-activations/2"
DTYPES = ("float16", "float32")
# Fields every store's metadata carries (format 1: manifest.json; format 2: the zarr group's attributes).
FIELDS = (("d_model", int), ("num_tokens", int), ("context_len", int), ("dtype", str))


def fail(path: str, problem: str, fix: str) -> UserError:
  return UserError(f"activation store {path}: {problem}. {fix}")


def check_fields(path: str, m: dict) -> None:
  """Validates the metadata fields both formats share."""
  for key, kind in FIELDS:
    if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
      raise fail(path, f"manifest field {key!r} missing or not {kind.__name__}", "Fix or re-export the manifest.")
  if m["dtype"] not in DTYPES:
    raise fail(path, f"dtype {m['dtype']!r} is not one of {DTYPES}", "Re-export with --dtype float16 or float32.")
  if m["d_model"] <= 0 or m["context_len"] <= 0 or m["num_tokens"] < 0:
    raise fail(path, "d_model, context_len must be positive and num_tokens non-negative",
               "Fix or re-export the manifest.")
  if not isinstance(m.get("source", {}), dict):
    raise fail(path, "manifest field 'source' is not an object", "Fix or re-export the manifest.")


class Store(abc.ABC):
  """An opened, validated activation store (or a token-range view of one): metadata, chunk reads, row gathers."""

  path: str
  """The location as given (local path, s3://..., gs://...)."""
  format: str
  d_model: int
  dtype: str
  num_tokens: int
  context_len: int
  source: dict
  manifest: dict
  """The format's metadata as read (manifest.json, or the zarr group's attributes)."""
  has_tokens: bool
  segment_offsets: np.ndarray
  """[S + 1] global index where each segment starts, plus the total."""
  chunk_offsets: np.ndarray
  """[C + 1] global index where each chunk starts, plus the total; every chunk is whole contexts of one segment."""

  @property
  def num_chunks(self) -> int:
    return len(self.chunk_offsets) - 1

  @abc.abstractmethod
  def read_chunk(self, c: int) -> np.ndarray:
    """Activations [T_c, D] of chunk c in the stored dtype, checked against the store's record of it."""

  @abc.abstractmethod
  def read_chunk_tokens(self, c: int) -> np.ndarray:
    """Token ids [T_c] (int32) of chunk c."""

  @abc.abstractmethod
  def identity(self) -> dict:
    """What identifies the data (a run records it and checks it on resume); has a `digest`."""

  def chunk_of(self, global_K) -> np.ndarray:
    return np.searchsorted(self.chunk_offsets, np.asarray(global_K, np.int64), side="right") - 1

  def describe(self, global_index: int) -> str:
    """Where a token lives, for error messages."""
    c = int(self.chunk_of([global_index])[0])
    return f"chunk {c} (tokens {self.chunk_offsets[c]}-{self.chunk_offsets[c + 1] - 1}) of {self.path}"

  def gather_acts(self, global_K, dtype=np.float32) -> np.ndarray:
    """Activations [K, D] at arbitrary global token indices (dtype None = the store's)."""
    return self._gather(global_K, self.read_chunk, (self.d_model,), dtype or self.dtype)

  def gather_tokens(self, global_K) -> np.ndarray:
    """Token ids [K] at arbitrary global token indices."""
    self.require_tokens()
    return self._gather(global_K, self.read_chunk_tokens, (), np.int64)

  def read_acts(self, start: int, stop: int, dtype=np.float32) -> np.ndarray:
    """Activations [stop - start, D] of a contiguous token range."""
    return self.gather_acts(np.arange(start, stop, dtype=np.int64), dtype)

  def read_tokens(self, start: int, stop: int) -> np.ndarray:
    return self.gather_tokens(np.arange(start, stop, dtype=np.int64))

  def require_tokens(self) -> None:
    if not self.has_tokens:
      raise fail(self.path, "has no token shards", "Export it from text with experiments.export_activations.")

  def _gather(self, global_K, read, row_shape: tuple, dtype) -> np.ndarray:
    global_K = np.asarray(global_K, np.int64)
    out = np.empty((len(global_K),) + row_shape, dtype)
    if not len(global_K):
      return out
    if global_K.min() < 0 or global_K.max() >= self.num_tokens:
      raise IndexError(f"token index out of range [0, {self.num_tokens}) of {self.path}")
    chunk_K = self.chunk_of(global_K)
    order = np.argsort(chunk_K, kind="stable")
    bounds = np.flatnonzero(np.diff(chunk_K[order])) + 1
    for sel in np.split(order, bounds):
      c = int(chunk_K[sel[0]])
      out[sel] = read(c)[global_K[sel] - self.chunk_offsets[c]]
    return out

  def check_finite(self, rows_per_read: Optional[int] = None) -> None:
    """Raises the training loop's error if any activation is NaN/Inf (evaluation reads every row)."""
    del rows_per_read
    for c in range(self.num_chunks):
      finite_T = np.isfinite(self.read_chunk(c)).all(axis=1)
      if not finite_T.all():
        row = int(self.chunk_offsets[c] + np.argmin(finite_T))
        raise UserError(f"non-finite activations (NaN/Inf) at token {row}, {self.describe(row)}. Re-export that "
                        "part of the store or remove it.")
