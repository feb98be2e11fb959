"""Tests for metasae_jax.storage.heldout: the skip rule, batching across shards, token counts.

Legend: T = tokens, L = context_len.
"""

import numpy as np
import pytest

from metasae_jax.storage import heldout, store
from metasae_jax.core.errors import UserError


def test_skip_ignored_for_context_len_one(tmp_path):
  st = store.write_store(str(tmp_path / "s"), np.ones((10, 3), np.float32), context_len=1)
  assert heldout.resolve_num_tokens(st, 0, 1) == 10
  batches = list(heldout.iter_batches(st, 4, 10, 1))
  assert [len(b.index_B) for b in batches] == [4, 4, 2]
  with pytest.raises(UserError, match="exceeds"):
    heldout.resolve_num_tokens(st, 11, 1)


def test_batches_span_shards_and_keep_global_index(tmp_path):
  x = np.arange(24, dtype=np.float32)[:, None].repeat(2, 1)
  st = store.write_store(str(tmp_path / "s"), x, context_len=4, shard_tokens=8)
  idx = np.concatenate([b.index_B for b in heldout.iter_batches(st, 5, 12, 2)])
  want = [i for i in range(24) if i % 4 >= 2][:12]
  np.testing.assert_array_equal(idx, want)
  acts = np.concatenate([b.acts_BxD[:, 0] for b in heldout.iter_batches(st, 5, 12, 2)])
  np.testing.assert_array_equal(acts, want)


def test_context_of(tmp_path):
  st = store.write_store(str(tmp_path / "s"), np.zeros((16, 2), np.float32), np.arange(16, dtype=np.int32),
                         context_len=4, shard_tokens=8)
  ids, pos = heldout.context_of(st, 10)
  assert ids.tolist() == [8, 9, 10, 11] and pos == 2


def test_asking_for_more_than_the_store_stops_at_its_end(tmp_path):
  st = store.write_store(str(tmp_path / "s"), np.arange(12, dtype=np.float32)[:, None], context_len=4)
  idx = np.concatenate([b.index_B for b in heldout.iter_batches(st, 5, 100, 1)])
  np.testing.assert_array_equal(idx, [i for i in range(12) if i % 4 >= 1])
