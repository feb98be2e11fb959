"""Format 2 (`metasae-activations/2`): a zarr v3 group read and written through TensorStore, on any location.

Legend: T = tokens, D = d_model, C = chunks.
Layout under the store location (a local directory, s3://bucket/prefix or gs://bucket/prefix):
  zarr.json      the group; its attributes are the manifest (format, d_model, dtype, num_tokens, context_len,
                 chunk_tokens, source, has_tokens)
  activations/   [T, D] float16/float32, chunks of chunk_tokens tokens (whole contexts) x D
  tokens/        [T] int32, same chunking (stores exported from text)
  checksums/bK   the record of chunks 1024K..1024K+1023: [n, 2] little-endian uint32 (zlib crc32 of each chunk's
                 activations and tokens bytes), then the crc32 of those bytes; plain objects, each written whole
  train/, heldout/  views: groups whose attributes name the store (`view_of.path`) and a token range
Both arrays carry zarr's crc32c codec, so a damaged chunk fails to decode; the recorded checksums also catch
a chunk that was rewritten whole after the fact. The store's identity is a digest of the checksum list.
Rows beyond `num_tokens` (an export in progress) are not part of the store.
"""

import hashlib
import json
import threading
import zlib
from typing import Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage import location as loc_lib
from metasae_jax.storage.store_types import DTYPES, FORMAT_ZARR, Store, check_fields, fail

GROUP = "zarr.json"
ACTS, TOKENS, CHECKSUMS = "activations", "tokens", "checksums"
CHECKSUM_BLOCK = 1024
# Default tokens per chunk: a few MB at real widths (4096 x 576 float16 = 4.7 MB; x 1280 = 10 MB).
CHUNK_TOKENS = 4096


def crc(array: np.ndarray) -> int:
  array = np.ascontiguousarray(array)
  return zlib.crc32(memoryview(array).cast("B")) if array.size else zlib.crc32(b"")


def _codecs() -> list:
  return [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def _array_spec(where: loc_lib.Location, name: str) -> dict:
  # Chunks equal to the fill value are still written: a missing chunk must read as missing, never as zeros.
  return {"driver": "zarr3", "kvstore": where.join(name).kvstore(), "store_data_equal_to_fill_value": True}


def _ts():
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  return ts


def read_checksums(path: str, n_chunks: int) -> np.ndarray:
  """[n_chunks, 2] uint32, the record written at export (a damaged or missing block is a UserError)."""
  where = loc_lib.parse(path).join(CHECKSUMS)
  parts = []
  for k in range(-(-n_chunks // CHECKSUM_BLOCK)):
    raw = loc_lib.read_bytes(where, f"b{k}")
    want = min(CHECKSUM_BLOCK, n_chunks - k * CHECKSUM_BLOCK)
    if raw is None or len(raw) < 8 * want + 4 or zlib.crc32(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
      raise fail(path, f"its checksum record {CHECKSUMS}/b{k} is missing or damaged", "Re-export the store.")
    parts.append(np.frombuffer(raw[:-4], "<u4").reshape(-1, 2)[:want])
  return np.concatenate(parts).astype(np.uint32) if parts else np.zeros((0, 2), np.uint32)


def write_checksums(path: str, sums_Cx2: np.ndarray, first_chunk: int) -> None:
  """Rewrites the blocks holding chunks first_chunk.. (each block one whole object: no read-modify-write)."""
  where = loc_lib.parse(path).join(CHECKSUMS)
  for k in range(first_chunk // CHECKSUM_BLOCK, -(-len(sums_Cx2) // CHECKSUM_BLOCK)):
    body = np.ascontiguousarray(sums_Cx2[k * CHECKSUM_BLOCK:(k + 1) * CHECKSUM_BLOCK], "<u4").tobytes()
    loc_lib.write_bytes(where, f"b{k}", body + zlib.crc32(body).to_bytes(4, "little"))


def read_group(path: str) -> Optional[dict]:
  """The attributes of the zarr group at `path` (None if there is none)."""
  where = loc_lib.parse(path)
  g = loc_lib.read_json(where, GROUP)
  if g is None:
    return None
  if not isinstance(g, dict) or g.get("node_type") != "group":
    raise fail(path, f"{GROUP} is not a zarr group", "Re-export the store.")
  attrs = g.get("attributes", {})
  if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_ZARR:
    raise fail(path, f"zarr group has format {attrs.get('format')!r}, expected {FORMAT_ZARR!r}",
               "Pass a store written by experiments.export_activations or experiments.convert_store.")
  return attrs


def write_group(path: str, attrs: dict) -> None:
  loc_lib.write_json(loc_lib.parse(path), GROUP, {"zarr_format": 3, "node_type": "group", "attributes": attrs})


def read_manifest(path: str) -> Optional[dict]:
  """The manifest of a store or view at `path` (a view's merged with its base's, num_tokens its own); None if no
  zarr group is there."""
  attrs = read_group(path)
  if attrs is None:
    return None
  view = attrs.get("view_of")
  if view is None:
    _check_base(path, attrs)
    return attrs
  start, stop = _view_range(path, view)
  base = read_group(loc_lib.resolve(path, view["path"]))
  if base is None or "view_of" in base:
    raise fail(path, f"view of {view['path']!r}, which holds no store", "Rewrite the view (rerun the exporter).")
  _check_base(path, base)
  if stop > base["num_tokens"]:
    raise fail(path, f"view range [{start}, {stop}) exceeds the store's {base['num_tokens']} tokens",
               "Rewrite the view (rerun the exporter).")
  return dict(base, num_tokens=stop - start, view_of=view, store_tokens=base["num_tokens"])


def _check_base(path: str, attrs: dict) -> None:
  check_fields(path, attrs)
  if not isinstance(attrs.get("chunk_tokens"), int) or attrs["chunk_tokens"] <= 0:
    raise fail(path, "manifest field 'chunk_tokens' missing or not a positive int", "Re-export the store.")


def _view_range(path: str, view) -> tuple:
  ok = (isinstance(view, dict) and isinstance(view.get("path"), str) and isinstance(view.get("tokens"), list)
        and len(view["tokens"]) == 2 and all(isinstance(t, int) for t in view["tokens"])
        and 0 <= view["tokens"][0] <= view["tokens"][1])
  if not ok:
    raise fail(path, f"view_of {view!r} is not {{'path': ..., 'tokens': [start, stop]}}",
               "Rewrite the view (rerun the exporter).")
  return tuple(view["tokens"])


class ZarrStore(Store):
  """A format-2 store (or view): chunk reads through TensorStore, each checked against its recorded checksum."""

  def __init__(self, path: str, m: dict, base_path: str, start: int, stop: int):
    self.path, self.manifest, self.format = path, m, FORMAT_ZARR
    self.d_model, self.dtype, self.context_len = m["d_model"], m["dtype"], m["context_len"]
    self.source = dict(m.get("source", {}))
    self.base_path, self.start, self.num_tokens = base_path, start, stop - start
    self.has_tokens = bool(m.get("has_tokens"))
    self.chunk_tokens = m["chunk_tokens"]
    where = loc_lib.parse(base_path)
    ts = _ts()
    try:
      self._acts = ts.open(_array_spec(where, ACTS), open=True, read=True).result()
      self._tokens = ts.open(_array_spec(where, TOKENS), open=True, read=True).result() if self.has_tokens else None
    except ValueError as e:
      raise fail(path, f"cannot open its arrays ({loc_lib.one_line(e)})",
                 "The store is incomplete or damaged; re-export it (rerunning the exporter resumes).") from None
    total = int(self._acts.shape[0]) if self._acts.ndim == 2 else -1
    if self._acts.ndim != 2 or self._acts.shape[1] != self.d_model or str(self._acts.dtype.numpy_dtype) != self.dtype:
      raise fail(path, f"activations array is {self._acts.dtype} {tuple(self._acts.shape)}, manifest says "
                 f"{self.dtype} [T, {self.d_model}]", "Re-export the store.")
    base_count = _base_count(m)
    if total < base_count:
      raise fail(path, f"activations array holds {total} rows, manifest says {base_count}", "Re-export the store.")
    n_chunks = -(-base_count // self.chunk_tokens)
    self._sums_Cx2 = read_checksums(base_path, n_chunks)
    # Base chunk grid, clipped to the view.
    grid = np.minimum(np.arange(n_chunks + 1, dtype=np.int64) * self.chunk_tokens, base_count)
    lo = int(np.searchsorted(grid, start, side="right") - 1) if self.num_tokens else 0
    hi = int(np.searchsorted(grid, stop, side="left")) if self.num_tokens else 0
    self._first_chunk = lo
    inner = [int(g) for g in grid[lo + 1:hi]]
    self.chunk_offsets = np.array([0] + [g - start for g in inner] + [self.num_tokens] if self.num_tokens else [0],
                                  np.int64)
    self.segment_offsets = np.array([0, self.num_tokens], np.int64)
    self._base_grid = grid
    self._cache: dict = {}
    self._lock = threading.Lock()

  def _base_chunk(self, c: int) -> tuple:
    b = self._first_chunk + c
    return b, int(self._base_grid[b]), int(self._base_grid[b + 1])

  def _read_checked(self, array, c: int, column: int, what: str) -> np.ndarray:
    b, a, z = self._base_chunk(c)
    key = (column, b)
    with self._lock:
      hit = self._cache.get(key)
    if hit is None:
      try:
        hit = np.asarray(array[a:z].read().result())
      except ValueError as e:
        raise UserError(f"activation store {self.base_path}: chunk {b} of {what} (tokens {a}-{z - 1}) is damaged "
                        f"or missing ({loc_lib.one_line(e)}). Re-export the store or restore that chunk.") from None
      if crc(hit) != int(self._sums_Cx2[b, column]):
        raise UserError(f"activation store {self.base_path}: chunk {b} of {what} (tokens {a}-{z - 1}) does not match "
                        "the checksum recorded at export (it changed after the store was written). Re-export the "
                        "store or restore that chunk.")
      with self._lock:  # the last few chunks stay: streaming readers ask for neighbouring rows again
        self._cache[key] = hit
        while len(self._cache) > 4:
          self._cache.pop(next(iter(self._cache)))
    lo = max(self.start - a, 0)
    hi = min(self.start + self.num_tokens, z) - a
    return hit[lo:hi]

  def read_chunk(self, c: int) -> np.ndarray:
    return self._read_checked(self._acts, c, 0, ACTS)

  def read_chunk_tokens(self, c: int) -> np.ndarray:
    self.require_tokens()
    return self._read_checked(self._tokens, c, 1, TOKENS)

  def identity(self) -> dict:
    """Digest of the base store's fields and checksum list, and the view's token range."""
    fields = {k: self.manifest.get(k) for k in ("format", "d_model", "dtype", "context_len", "chunk_tokens", "source",
                                                "has_tokens")}
    base_count = _base_count(self.manifest)
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    h.update(np.ascontiguousarray(self._sums_Cx2, "<u4").tobytes())
    out = {"format": FORMAT_ZARR, "source": self.source, "d_model": self.d_model, "dtype": self.dtype,
           "num_tokens": self.num_tokens, "context_len": self.context_len, "store_tokens": base_count,
           "tokens": [self.start, self.start + self.num_tokens], "chunks": int(len(self._sums_Cx2)),
           "checksums_sha256": h.hexdigest()}
    out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
    return out


def _base_count(m: dict) -> int:
  return int(m["store_tokens"]) if "view_of" in m else int(m["num_tokens"])


def open_zarr(path: str) -> Optional[ZarrStore]:
  """The format-2 store or view at `path`, None if there is no zarr group there."""
  m = read_manifest(path)
  if m is None:
    return None
  if "view_of" not in m:
    return ZarrStore(path, m, path, 0, m["num_tokens"])
  start, stop = _view_range(path, m["view_of"])
  return ZarrStore(path, m, loc_lib.resolve(path, m["view_of"]["path"]), start, stop)


def write_view(path: str, base_path: str, start: int, stop: int) -> None:
  """A view of tokens [start, stop) of the store at `base_path` (no copy); left alone if already the same."""
  rel = loc_lib.parse(base_path).relative_to(loc_lib.parse(path))
  attrs = {"format": FORMAT_ZARR, "view_of": {"path": rel if rel is not None else loc_lib.normalize(base_path),
                                              "tokens": [int(start), int(stop)]}}
  try:
    same = read_group(path) == attrs
  except UserError:
    same = False
  if not same:
    write_group(path, attrs)


class Writer:
  """Appends whole chunks to a format-2 store; each chunk is durable before the manifest counts it."""

  def __init__(self, path: str, attrs: dict):
    self.path, self.attrs = path, dict(attrs)
    self.where = loc_lib.parse(path)
    ts = _ts()
    self._acts = ts.open(_array_spec(self.where, ACTS), open=True, write=True).result()
    self._tokens = (ts.open(_array_spec(self.where, TOKENS), open=True, write=True).result()
                    if attrs.get("has_tokens") else None)
    self._sums_Cx2 = read_checksums(path, -(-self.num_tokens // attrs["chunk_tokens"]))

  @property
  def num_tokens(self) -> int:
    return int(self.attrs["num_tokens"])

  @staticmethod
  def create(path: str, d_model: int, dtype: str, context_len: int, chunk_tokens: int, source: dict,
             has_tokens: bool, capacity: int, extra: Optional[dict] = None) -> "Writer":
    """A new, empty store (arrays sized for `capacity` tokens; the manifest's num_tokens says what is written)."""
    if dtype not in DTYPES:
      raise UserError(f"dtype {dtype!r} is not one of {DTYPES}.")
    chunk_tokens = max(1, chunk_tokens // context_len) * context_len
    where = loc_lib.parse(path)
    ts = _ts()
    cap = max(capacity, 1)
    specs = [(ACTS, [cap, d_model], [chunk_tokens, d_model], dtype)]
    if has_tokens:
      specs.append((TOKENS, [cap], [chunk_tokens], "int32"))
    for name, shape, chunk, dt in specs:
      ts.open(dict(_array_spec(where, name), metadata={
          "shape": shape, "data_type": dt, "codecs": _codecs(), "fill_value": 0,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}}}),
              create=True).result()
    attrs = dict({"format": FORMAT_ZARR, "d_model": int(d_model), "dtype": dtype, "num_tokens": 0,
                  "context_len": int(context_len), "chunk_tokens": int(chunk_tokens), "has_tokens": bool(has_tokens),
                  "checksum": "zlib crc32 of each chunk's little-endian bytes: checksums/b{c // 1024} row c % 1024 "
                              "= [activations, tokens]",
                  "source": source}, **(extra or {}))
    write_group(path, attrs)
    return Writer(path, attrs)

  def append(self, acts_TxD: np.ndarray, tokens_T: Optional[np.ndarray]) -> None:
    """Writes tokens [num_tokens, num_tokens + T) as whole chunks (only the store's last chunk may be short)."""
    n, t, ct = self.num_tokens, int(acts_TxD.shape[0]), self.attrs["chunk_tokens"]
    if n % ct:
      raise UserError(f"activation store {self.path} ends in a short chunk ({n} tokens); it is finished.")
    need = n + t
    for arr, shape in ((self._acts, [need, self.attrs["d_model"]]), (self._tokens, [need]),
                       ):
      if arr is not None and arr.shape[0] < shape[0]:
        arr.resize(exclusive_max=shape, expand_only=True, resize_metadata_only=True).result()
    self._refresh()
    acts_TxD = np.ascontiguousarray(acts_TxD, self.attrs["dtype"])
    sums = []
    futures = [self._acts[n:need].write(acts_TxD)]
    if self._tokens is not None:
      tokens_T = np.ascontiguousarray(tokens_T, np.int32)
      futures.append(self._tokens[n:need].write(tokens_T))
    for a in range(0, t, ct):
      sums.append([crc(acts_TxD[a:a + ct]), crc(tokens_T[a:a + ct]) if self._tokens is not None else 0])
    for f in futures:
      f.result()
    # The record is written after the data it describes and before the manifest counts it.
    self._sums_Cx2 = np.concatenate([self._sums_Cx2[:n // ct], np.asarray(sums, np.uint32).reshape(-1, 2)])
    write_checksums(self.path, self._sums_Cx2, n // ct)
    self.attrs["num_tokens"] = need
    write_group(self.path, self.attrs)

  def drop_short_chunk(self) -> None:
    """Uncounts a short last chunk (a finished export asked to grow): the export recomputes it whole."""
    n, ct = self.num_tokens, self.attrs["chunk_tokens"]
    if n % ct:
      self.attrs["num_tokens"] = n - n % ct
      self.attrs.pop("corpus_exhausted", None)
      write_group(self.path, self.attrs)

  def drop_uncounted(self) -> None:
    """Deletes the chunk a killed export may have written past what the manifest counts (one append in flight
    writes one chunk), so the resumed export creates it afresh: rewriting in place needs the object's
    generation, which some servers do not report (gcp-storage-emulator)."""
    drop_chunk_objects(self.path, -(-self.num_tokens // self.attrs["chunk_tokens"]), self._tokens is not None)

  def _refresh(self) -> None:
    ts = _ts()
    # A fresh context per append: nothing cached from the previous write (the checksum chunk is rewritten whole,
    # never conditionally on a generation remembered from before).
    ctx = ts.Context()
    self._acts = ts.open(_array_spec(self.where, ACTS), open=True, write=True, context=ctx).result()
    if self._tokens is not None:
      self._tokens = ts.open(_array_spec(self.where, TOKENS), open=True, write=True, context=ctx).result()

  def finish(self, **extra) -> None:
    """Shrinks the arrays to the tokens written and records `extra` manifest fields."""
    n, ct = self.num_tokens, self.attrs["chunk_tokens"]
    for arr, shape in ((self._acts, [n, self.attrs["d_model"]]), (self._tokens, [n])):
      if arr is not None and arr.shape[0] > shape[0]:
        arr.resize(exclusive_max=shape, shrink_only=True, resize_metadata_only=True).result()
    self.attrs.update(extra)
    write_group(self.path, self.attrs)


def drop_chunk_objects(path: str, c: int, has_tokens: bool) -> None:
  """Deletes chunk c's objects (plain deletes of known keys: no listing; gcp-storage-emulator ignores a listing's
  key range and TensorStore aborts on what it gets back)."""
  where = loc_lib.parse(path)
  for name, key in ((ACTS, f"c/{c}/0"), (TOKENS, f"c/{c}")) if has_tokens else ((ACTS, f"c/{c}/0"),):
    loc_lib.delete(where.join(name), key)


def write_zarr(path: str, acts_TxD: np.ndarray, tokens_T: Optional[np.ndarray], context_len: int, source: dict,
               chunk_tokens: int) -> ZarrStore:
  dtype = str(acts_TxD.dtype) if str(acts_TxD.dtype) in DTYPES else "float32"
  w = Writer.create(path, int(acts_TxD.shape[1]), dtype, context_len, chunk_tokens, source, tokens_T is not None,
                    int(acts_TxD.shape[0]))
  if len(acts_TxD):
    w.append(acts_TxD, tokens_T)
  w.finish()
  return open_zarr(path)
