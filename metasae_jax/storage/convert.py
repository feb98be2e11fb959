"""Copies a store (format 1, or zarr anywhere) into a new zarr store at any location, with its train/held-out split.

Legend: T = tokens, D = d_model.
Rows, tokens, source and the exporter's split come over unchanged, so training on the copy gives the same SAEs
(training/data.py reads both formats in the same chunks when the old shards are whole multiples of the chunk).
"""

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage import location, lock, zarr_store
from metasae_jax.storage import store as store_lib

KEEP = ("corpus_exhausted",)


def convert(old: str, new: str, chunk_tokens: int = zarr_store.CHUNK_TOKENS, progress=None) -> store_lib.Store:
  """Writes NEW (zarr) from OLD; refuses a NEW that already holds anything. Returns the new store."""
  src = store_lib.open_store(old)
  c = src.context_len
  for a, b in zip(src.segment_offsets[:-1], src.segment_offsets[1:-1]):
    if (b - a) % c:
      raise UserError(f"activation store {old}: a shard of {b - a} tokens ends mid-context (context_len {c}); a zarr "
                      "store has contexts end to end, so the copy would move positions. Re-export it instead.")
  if location.normalize(old) == location.normalize(new):
    raise UserError(f"OLD and NEW are the same location {old}; pass a new location for the zarr store.")
  if store_lib.exists(new) or (not location.is_remote(new) and _nonempty_dir(new)):
    raise UserError(f"{new} already holds files; pass a new location (nothing was written).")
  with lock.writer_lock(new, "activation store"):
    extra = {k: src.manifest[k] for k in KEEP if k in src.manifest}
    writer = zarr_store.Writer.create(new, src.d_model, src.dtype, c, chunk_tokens, src.source, src.has_tokens,
                                      src.num_tokens, extra=dict(extra, converted_from=location.normalize(old)))
    step = writer.attrs["chunk_tokens"] * max(1, (1 << 20) // writer.attrs["chunk_tokens"])
    for start in range(0, src.num_tokens, step):
      stop = min(start + step, src.num_tokens)
      acts = src.read_acts(start, stop, None)
      tokens = src.read_tokens(start, stop) if src.has_tokens else None
      writer.append(acts, None if tokens is None else np.asarray(tokens, np.int32))
      if progress:
        progress(stop - start)
    writer.finish()
    out = store_lib.open_store(new)
    split = store_lib.split_of(old) if "view_of" not in src.manifest else None
    if split:
      for view, name in zip(split, (store_lib.TRAIN_VIEW, store_lib.HELDOUT_VIEW)):
        (a, b), = store_lib.token_ranges(view)[1]
        store_lib.write_token_view(location.join(new, name), out, a, b)
  return out


def _nonempty_dir(path: str) -> bool:
  import os  # pylint: disable=g-import-not-at-top
  return os.path.isdir(path) and bool(os.listdir(path))
