"""The format-1 activation store (manifest.json + .npy shards, still readable): validation errors for bad stores,
skip rule per shard, deterministic batches. Format 2 (zarr) is tested in test_zarr_store.py."""

import json
import os

import numpy as np
import pytest

from metasae_jax.training import data
from metasae_jax.storage import heldout, positions, store
from metasae_jax.core.errors import UserError


def _good(tmp_path, n=256, d=8, context_len=16, dtype=np.float32, tokens=True):
  path = str(tmp_path / "s")
  acts = np.random.default_rng(0).normal(size=(n, d)).astype(dtype)
  toks = np.arange(n, dtype=np.int32) if tokens else None
  store.write_store(path, acts, toks, context_len=context_len, source={"model": "m"}, shard_tokens=96, fmt="npy")
  return path, acts


def _edit_manifest(path, fn):
  mpath = os.path.join(path, store.MANIFEST)
  with open(mpath) as f:
    m = json.load(f)
  fn(m)
  with open(mpath, "w") as f:
    json.dump(m, f)


def _break(kind, path):
  if kind == "missing_dir":
    return path + "-nope"
  if kind == "missing_manifest":
    os.remove(os.path.join(path, store.MANIFEST))
  elif kind == "malformed_manifest":
    with open(os.path.join(path, store.MANIFEST), "w") as f:
      f.write("{not json")
  elif kind == "wrong_format":
    _edit_manifest(path, lambda m: m.update(format="other/2"))
  elif kind == "bad_dtype":
    _edit_manifest(path, lambda m: m.update(dtype="int8"))
  elif kind == "dtype_mismatch":
    _edit_manifest(path, lambda m: m.update(dtype="float16"))
  elif kind == "missing_shard":
    os.remove(os.path.join(path, "acts-00001.npy"))
  elif kind == "truncated_shard":
    p = os.path.join(path, "acts-00001.npy")
    with open(p, "rb") as f:
      raw = f.read()
    with open(p, "wb") as f:
      f.write(raw[:len(raw) // 2])
  elif kind == "wrong_shape_shard":
    np.save(os.path.join(path, "acts-00001.npy"), np.zeros((96, 9), np.float32))
  elif kind == "count_mismatch":
    _edit_manifest(path, lambda m: m.update(num_tokens=999))
  elif kind == "bad_tokens":
    np.save(os.path.join(path, "tokens-00000.npy"), np.zeros((3,), np.int32))
  return path


@pytest.mark.parametrize("kind,needle", [
    ("missing_dir", "does not exist"), ("missing_manifest", "no manifest.json"),
    ("malformed_manifest", "not valid JSON"), ("wrong_format", "format"), ("bad_dtype", "dtype"),
    ("dtype_mismatch", "dtype"), ("missing_shard", "missing"), ("truncated_shard", "unreadable|shape"),
    ("wrong_shape_shard", "shape"), ("count_mismatch", "num_tokens"), ("bad_tokens", "token shard"),
])
def test_bad_store_fails_with_readable_error(tmp_path, kind, needle):
  path, _ = _good(tmp_path)
  path = _break(kind, path)
  with pytest.raises(UserError, match=needle) as e:
    store.open_store(path)
  assert "\n" not in str(e.value)


def test_roundtrip_and_offsets(tmp_path):
  path, acts = _good(tmp_path)
  s = store.open_store(path, require_tokens=True)
  assert s.num_tokens == 256 and len(s.segment_offsets) == 4 and s.has_tokens
  np.testing.assert_array_equal(s.read_acts(0, 256, None), acts)
  np.testing.assert_array_equal(s.segment_offsets, [0, 96, 192, 256])


@pytest.mark.parametrize("n,context_len,skip", [(256, 16, 1), (250, 16, 1), (250, 16, 3), (100, 1, 1),
                                                (64, 8, 0)])
def test_skip_rule_matches_brute_force(tmp_path, n, context_len, skip):
  keep = [t for t in range(n) if context_len == 1 or t % context_len >= skip]
  assert positions.kept_count(n, context_len, skip) == len(keep)
  st = store.write_store(str(tmp_path / "s"), np.zeros((n, 2), np.float32), context_len=context_len)
  kept = positions.KeptTokens(st, skip)
  assert kept.num_kept == len(keep)
  np.testing.assert_array_equal(kept.kept_to_global(np.arange(len(keep))), keep)
  ranks = kept.global_to_kept(np.arange(n))
  np.testing.assert_array_equal(ranks[keep], np.arange(len(keep)))
  assert np.all(np.delete(ranks, keep) == -1)


def test_batches_cover_each_usable_token_once_per_epoch_and_are_deterministic(tmp_path):
  path, acts = _good(tmp_path)
  s = store.open_store(path)
  src = data.BatchSource(s, batch_size=40, seed=3, skip_first_positions=1)
  assert src.batches_per_epoch == 240 // 40
  seen = np.concatenate([src.batch(i) for i in range(src.batches_per_epoch)])
  want = acts[[t for t in range(256) if t % 16 != 0]]
  np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(want, axis=0))
  again = data.BatchSource(s, batch_size=40, seed=3, skip_first_positions=1)
  np.testing.assert_array_equal(again.batch(7), src.batch(7))
  assert not np.array_equal(src.batch(0), src.batch(src.batches_per_epoch))  # epochs reshuffle


def test_process_slices_make_up_the_global_batch(tmp_path):
  path, _ = _good(tmp_path)
  s = store.open_store(path)
  whole = data.BatchSource(s, 40, 0, streams=2).batch(2)  # the order depends on the streams, not the processes
  parts = np.concatenate([data.BatchSource(s, 40, 0, process_index=p, process_count=2).batch(2) for p in (0, 1)])
  np.testing.assert_array_equal(whole, parts)


def test_nan_batch_names_the_shard(tmp_path):
  path = str(tmp_path / "nan")
  acts = np.ones((64, 4), np.float32)
  acts[40] = np.nan
  store.write_store(path, acts, shard_tokens=32, fmt="npy")
  src = data.BatchSource(store.open_store(path), 64, 0, 0)
  with pytest.raises(UserError, match="acts-00001.npy"):
    src.batch(0)


def test_too_small_store_and_bad_skip(tmp_path):
  path, _ = _good(tmp_path)
  s = store.open_store(path)
  with pytest.raises(UserError, match="fewer than one batch"):
    data.BatchSource(s, 4096, 0)
  with pytest.raises(UserError, match="skip_first_positions"):
    data.BatchSource(s, 8, 0, skip_first_positions=16)


def test_view_splits_shards_without_copying(tmp_path):
  path, acts = _good(tmp_path)
  base = store.open_store(path)
  train = store.write_view(str(tmp_path / "train"), base, [0, 1])
  held = store.write_view(str(tmp_path / "held"), base, [2])
  assert (train.num_tokens, held.num_tokens) == (192, 64)
  np.testing.assert_array_equal(held.read_acts(0, 64, None), acts[192:])
  np.testing.assert_array_equal(held.read_tokens(0, 64), np.arange(192, 256))
  assert not any(f.endswith(".npy") for f in os.listdir(tmp_path / "held"))


def test_training_and_heldout_apply_the_skip_rule_per_shard(tmp_path):
  """Shards of 20 tokens with contexts of 8: positions restart at every shard (the store format)."""
  n, length, skip, shard = 60, 8, 2, 20
  x = np.arange(n, dtype=np.float32)[:, None].repeat(3, 1)
  st = store.write_store(str(tmp_path / "s"), x, context_len=length, shard_tokens=shard, fmt="npy")
  keep = [t for t in range(n) if (t % shard) % length >= skip]
  src = data.BatchSource(st, batch_size=4, seed=0, skip_first_positions=skip)
  seen = np.concatenate([src.batch(i)[:, 0] for i in range(src.batches_per_epoch)])
  assert src.num_usable == len(keep)
  assert set(seen.astype(int).tolist()) <= set(keep) and len(seen) == len(keep) // 4 * 4
  idx = np.concatenate([b.index_B for b in heldout.iter_batches(st, 7, len(keep), skip)])
  np.testing.assert_array_equal(idx, keep)
  ctx, pos = heldout.context_of(store.write_store(str(tmp_path / "t"), x, np.arange(n, dtype=np.int32),
                                                  context_len=length, shard_tokens=shard, fmt="npy"), 41)
  assert ctx.tolist() == list(range(40, 48)) and pos == 1
  assert positions.KeptTokens(st, skip).context_end([17, 19, 21]).tolist() == [19, 19, 27]
