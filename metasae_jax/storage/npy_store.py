"""Format 1 (`metasae-activations/1`): a local directory with `manifest.json` and `.npy` shards.

Legend: T = tokens in a shard, D = d_model.
Read (memory-mapped) for users who have such stores, and written for tests and for resuming a format-1 export
that was started before format 2; new exports write zarr (`zarr_store.py`). A shard is a segment (contexts
restart in every shard); chunks are CHUNK_TOKENS-token pieces of a shard on the shard file's own grid, so a
store converted with the same chunk size reads in the same chunks. Format 1 records no checksums: its
identity hashes a few rows per shard, as it always has (convert the store to have every chunk checked).
"""

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from metasae_jax.storage import atomic
from metasae_jax.storage.store_types import DTYPES, FORMAT_NPY, Store, check_fields, fail

MANIFEST = "manifest.json"
# Chunk size of format-1 reads (tokens, rounded down to whole contexts): the default zarr chunk, so a store
# converted with the default chunk size is read in the same chunks.
CHUNK_TOKENS = 4096


def read_manifest(path: str) -> dict:
  """Reads and checks the manifest's fields (not the shards)."""
  if not os.path.isdir(path):
    raise fail(path, "directory does not exist",
               "Pass --activations pointing at a store written by experiments.export_activations.")
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    raise fail(path, f"no {MANIFEST} (nor zarr.json)",
               "The export may not have finished; rerun experiments.export_activations.")
  try:
    with open(mpath) as f:
      m = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise fail(path, f"{MANIFEST} is not valid JSON ({e})",
               "Re-export the store; the manifest is written atomically, so this file was edited or damaged.")
  if not isinstance(m, dict):
    raise fail(path, f"{MANIFEST} is not a JSON object", "Re-export the store.")
  if m.get("format") != FORMAT_NPY:
    raise fail(path, f"format is {m.get('format')!r}, expected {FORMAT_NPY!r}",
               "Re-export with experiments.export_activations or convert the store.")
  check_fields(path, m)
  if not isinstance(m.get("shards"), list):
    raise fail(path, "manifest field 'shards' missing or not list", "Fix or re-export the manifest.")
  return m


class NpyStore(Store):
  """A validated format-1 store (or view) with its shards memory-mapped."""

  def __init__(self, path: str, m: dict, acts: list, tokens: list, files: list):
    self.path, self.manifest, self.format = path, m, FORMAT_NPY
    self.d_model, self.dtype, self.context_len = m["d_model"], m["dtype"], m["context_len"]
    self.source = dict(m.get("source", {}))
    self._acts, self._tokens, self._files = acts, tokens, files
    sizes = [a.shape[0] for a in acts]
    self.num_tokens = int(sum(sizes))
    self.has_tokens = all(t is not None for t in tokens)
    self.segment_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    step = max(1, CHUNK_TOKENS // self.context_len) * self.context_len
    bounds, owners = [], []
    for s, entry in enumerate(m["shards"]):
      first = (entry.get("rows") or [0])[0]  # the shard file's own chunk grid, also inside a row-range view
      cuts = {0, sizes[s]} | {g - first for g in range((first // step + 1) * step, first + sizes[s], step)}
      for a, b in zip(sorted(cuts)[:-1], sorted(cuts)[1:]):
        bounds.append((int(self.segment_offsets[s]) + a, int(self.segment_offsets[s]) + b))
        owners.append((s, a, b))
    self.chunk_offsets = np.array([b[0] for b in bounds] + [self.num_tokens], np.int64)
    self._owners = owners

  def read_chunk(self, c: int) -> np.ndarray:
    s, a, b = self._owners[c]
    return self._acts[s][a:b]

  def read_chunk_tokens(self, c: int) -> np.ndarray:
    self.require_tokens()
    s, a, b = self._owners[c]
    return self._tokens[s][a:b]

  def gather_acts(self, global_K, dtype=np.float32) -> np.ndarray:
    """Row gathers straight from the memory maps (a format-1 shard reads single rows cheaply)."""
    return self._gather_shards(global_K, self._acts, (self.d_model,), dtype or self.dtype)

  def gather_tokens(self, global_K) -> np.ndarray:
    self.require_tokens()
    return self._gather_shards(global_K, self._tokens, (), np.int64)

  def _gather_shards(self, global_K, arrays, row_shape, dtype) -> np.ndarray:
    global_K = np.asarray(global_K, np.int64)
    shard_K = np.searchsorted(self.segment_offsets, global_K, side="right") - 1
    out = np.empty((len(global_K),) + row_shape, dtype)
    for s in np.unique(shard_K):
      sel = np.nonzero(shard_K == s)[0]
      out[sel] = arrays[s][global_K[sel] - self.segment_offsets[s]]
    return out

  def describe(self, global_index: int) -> str:
    s = int(np.searchsorted(self.segment_offsets, global_index, side="right") - 1)
    return (f"shard {self._files[s]} (row {global_index - self.segment_offsets[s]}) of {self.path}")

  def identity(self) -> dict:
    return fingerprint(self)


def open_npy(path: str) -> NpyStore:
  """Validates the manifest and every shard, memory-maps the shards."""
  m = read_manifest(path)
  acts, tokens, files = [], [], []
  for i, entry in enumerate(m["shards"]):
    if not isinstance(entry, dict) or not isinstance(entry.get("activations"), str) or not isinstance(
        entry.get("num_tokens"), int):
      raise fail(path, f"shard entry {i} needs 'activations' (file name) and 'num_tokens' (int)",
                 "Fix or re-export the manifest.")
    rows = _rows(path, i, entry)
    a = _load(path, os.path.join(path, entry["activations"]), "activations")[rows]
    n = entry["num_tokens"]
    if a.ndim != 2 or a.shape != (n, m["d_model"]):
      raise fail(path, f"shard {entry['activations']} has shape {a.shape}, manifest says ({n}, {m['d_model']})",
                 "The shard is truncated or from another store; re-export it.")
    if a.dtype != np.dtype(m["dtype"]):
      raise fail(path, f"shard {entry['activations']} has dtype {a.dtype}, manifest says {m['dtype']}",
                 "Re-export the store so shards and manifest agree.")
    t = None
    if entry.get("tokens") is not None:
      t = _load(path, os.path.join(path, entry["tokens"]), "tokens")[rows]
      if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
        raise fail(path, f"token shard {entry['tokens']} has shape {t.shape} dtype {t.dtype}, expected ({n},) int32",
                   "Re-export the store.")
    acts.append(a)
    tokens.append(t)
    files.append(entry["activations"])
  total = sum(a.shape[0] for a in acts)
  if total != m["num_tokens"]:
    raise fail(path, f"shards hold {total} tokens but manifest num_tokens is {m['num_tokens']}",
               "Fix or re-export the manifest.")
  return NpyStore(path, m, acts, tokens, files)


def _rows(path: str, i: int, entry: dict) -> slice:
  """The rows of a shard file an entry lists: all of them, or `rows: [start, stop]` in a token-range view."""
  rows = entry.get("rows")
  if rows is None:
    return slice(None)
  if (not isinstance(rows, list) or len(rows) != 2 or not all(isinstance(r, int) for r in rows)
      or not 0 <= rows[0] <= rows[1] or rows[1] - rows[0] != entry["num_tokens"]):
    raise fail(path, f"shard entry {i} has rows {rows!r}; expected [start, stop] with stop - start = num_tokens",
               "Rewrite the view (rerun the exporter, which rewrites the train / held-out views).")
  return slice(rows[0], rows[1])


def _load(store_path: str, path: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise fail(store_path, f"{what} shard {os.path.basename(path)} is missing",
               "Re-export the store (rerunning the exporter resumes).")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise fail(store_path, f"{what} shard {os.path.basename(path)} is unreadable ({e})",
               "The shard is truncated or corrupt; re-export the store.")


def new_manifest(d_model: int, dtype: str, context_len: int, source: dict) -> dict:
  return {"format": FORMAT_NPY, "d_model": d_model, "dtype": dtype, "num_tokens": 0,
          "context_len": context_len, "source": source, "shards": []}


def append_shard(path: str, manifest: dict, acts_TxD: np.ndarray, tokens_T: Optional[np.ndarray]) -> dict:
  """Writes one complete shard atomically, then the manifest that lists it. Returns the new manifest."""
  i = len(manifest["shards"])
  entry: dict[str, Any] = {"activations": f"acts-{i:05d}.npy", "num_tokens": int(acts_TxD.shape[0])}
  atomic.save_npy(os.path.join(path, entry["activations"]), np.ascontiguousarray(acts_TxD.astype(manifest["dtype"])))
  if tokens_T is not None:
    entry["tokens"] = f"tokens-{i:05d}.npy"
    atomic.save_npy(os.path.join(path, entry["tokens"]), np.ascontiguousarray(tokens_T.astype(np.int32)))
  new = dict(manifest, shards=manifest["shards"] + [entry], num_tokens=manifest["num_tokens"] + entry["num_tokens"])
  write_manifest(path, new)
  return new


def write_manifest(path: str, manifest: dict) -> None:
  atomic.write_json(os.path.join(path, MANIFEST), manifest)


def write_npy(path: str, acts_TxD: np.ndarray, tokens_T: Optional[np.ndarray], context_len: int, source: dict,
              shard_tokens: int) -> NpyStore:
  os.makedirs(path, exist_ok=True)
  dtype = str(acts_TxD.dtype) if str(acts_TxD.dtype) in DTYPES else "float32"
  m = new_manifest(int(acts_TxD.shape[1]), dtype, context_len, source)
  write_manifest(path, m)
  for start in range(0, acts_TxD.shape[0], shard_tokens):
    sl = slice(start, start + shard_tokens)
    m = append_shard(path, m, acts_TxD[sl], None if tokens_T is None else tokens_T[sl])
  return open_npy(path)


def write_view(path: str, base: NpyStore, shard_indices) -> NpyStore:
  """A store listing some of `base`'s shards by relative path (no copy)."""
  os.makedirs(path, exist_ok=True)
  entries = []
  for i in shard_indices:
    entry = dict(base.manifest["shards"][i])
    for key in ("activations", "tokens"):
      if entry.get(key):
        entry[key] = os.path.relpath(os.path.join(base.path, entry[key]), path)
    entries.append(entry)
  m = dict(base.manifest, shards=entries, num_tokens=sum(e["num_tokens"] for e in entries),
           view_of={"path": os.path.relpath(base.path, path), "shards": [int(i) for i in shard_indices]})
  write_manifest(path, m)
  return open_npy(path)


def write_token_view(path: str, base: NpyStore, start: int, stop: int) -> NpyStore:
  """A store listing global tokens [start, stop) of `base` by relative path and row range (no copy)."""
  os.makedirs(path, exist_ok=True)
  entries = []
  for entry, offset in zip(base.manifest["shards"], base.segment_offsets):
    lo, hi = max(start - int(offset), 0), min(stop - int(offset), entry["num_tokens"])
    if lo >= hi:
      continue
    item = dict(entry, num_tokens=hi - lo)
    if (lo, hi) != (0, entry["num_tokens"]):
      item["rows"] = [lo, hi]
    for key in ("activations", "tokens"):
      if item.get(key):
        item[key] = os.path.relpath(os.path.join(base.path, item[key]), path)
    entries.append(item)
  m = dict(base.manifest, shards=entries, num_tokens=stop - start,
           view_of={"path": os.path.relpath(base.path, path), "tokens": [int(start), int(stop)]})
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      unchanged = json.load(f) == json.loads(json.dumps(m))
  except (OSError, ValueError):
    unchanged = False
  if not unchanged:  # rewriting an identical view would touch a finished store on every rerun
    write_manifest(path, m)
  return open_npy(path)


# Rows hashed per shard for the fingerprint: enough to tell two exports apart, cheap on any store size.
_FINGERPRINT_ROWS = 8
_HEAD_BYTES = 4096


def _file_digest(path: str, array: np.ndarray) -> str:
  """sha256 of a shard's first bytes (npy header) and a few fixed, evenly spaced rows."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    h.update(f.read(_HEAD_BYTES))
  n = array.shape[0]
  for i in sorted({int(i) for i in np.linspace(0, n - 1, _FINGERPRINT_ROWS)} if n else ()):
    h.update(np.ascontiguousarray(array[i]).tobytes())
  return h.hexdigest()[:16]


def fingerprint(s: NpyStore) -> dict:
  """What identifies a format-1 store's data: manifest fields (incl. source), shard names, sizes, sampled hashes."""
  shards = []
  for s_i, entry in enumerate(s.manifest["shards"]):
    apath = os.path.join(s.path, entry["activations"])
    item = {"activations": entry["activations"], "num_tokens": int(s._acts[s_i].shape[0]),
            "bytes": os.path.getsize(apath), "hash": _file_digest(apath, s._acts[s_i])}
    if s._tokens[s_i] is not None:
      item["tokens_hash"] = _file_digest(os.path.join(s.path, entry["tokens"]), s._tokens[s_i])
    shards.append(item)
  out = {"source": s.source, "d_model": s.d_model, "dtype": s.dtype, "num_tokens": s.num_tokens,
         "context_len": s.context_len, "shards": shards}
  out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
  return out
