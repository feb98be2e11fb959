"""Tests for metasae_jax.evaluation.firings: the sparse record equals the dense activations it was built from.

Legend: B = tokens in a batch, N = latents.
"""

import numpy as np

from metasae_jax.evaluation import firings


def test_recorder_roundtrip():
  rng = np.random.default_rng(0)
  rec = firings.Recorder(7)
  dense = []
  for b in range(3):
    acts_BxN = np.where(rng.random((5, 7)) < 0.3, rng.random((5, 7)), 0).astype(np.float32)
    dense.append(acts_BxN)
    rec.add(acts_BxN, np.arange(5) + 100 * b)
  f = rec.result()
  want = np.concatenate(dense)
  np.testing.assert_array_equal(f.csr(values=True).toarray(), want)
  np.testing.assert_array_equal(f.csr().toarray(), (want > 0).astype(np.int32))
  np.testing.assert_array_equal(f.counts_N(), (want > 0).sum(0))
  assert f.index_T.tolist() == [i + 100 * b for b in range(3) for i in range(5)]


def test_empty_recorder():
  f = firings.Recorder(4).result()
  assert f.num_tokens == 0 and f.counts_N().tolist() == [0, 0, 0, 0]
