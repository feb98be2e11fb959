"""The slow-path event counts of a step (spilling rows, dense fallback) against numpy.

Legend: B = batch, D = d_model, N = latents, C = candidate slots per row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.core import losses, sae, topk
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.train_step import init_train_state, train_step

B, D, N, K = 1024, 8, 1100, 1  # C = 33 slots, and C * SPARSE_MIN_RATIO <= N: the sparse path with its fallback
A = 40  # encoder columns along u: each aligned row has A > C large entries, all inside the top K * B


def _problem(aligned_rows: int, seed: int = 0):
  """Params whose first A encoder columns share a direction u, and a batch with `aligned_rows` rows along u.

  Those rows have A large pre-activations each, more than their C slots, and
  aligned_rows * A <= K * B of them all make the batch's top: the rows spill.
  """
  rng = np.random.default_rng(seed)
  u = rng.normal(size=D)
  u /= np.linalg.norm(u)
  w_enc = rng.normal(size=(D, N)) * 0.1
  w_enc[:, :A] += 2.0 * u[:, None]
  x = rng.normal(size=(B, D))
  x[:aligned_rows] = 5.0 * u + 0.01 * rng.normal(size=(aligned_rows, D))
  params = sae.init_params(jax.random.PRNGKey(seed), D, N)
  params = dict(params, W_enc=jnp.asarray(w_enc, jnp.float32))
  return params, x.astype(np.float32)


def _expected(params, x):
  """Brute force by full sorts on the float32 pre-activations.

  A row takes the spill path when its C-th largest reaches the (K*B)-th largest
  of all rows' top C (the candidates' threshold, which can only be at or below
  the exact one): it may hold more selected entries than slots.
  """
  pre = np.asarray(sae.pre_activations(params, sae.standardize(jnp.asarray(x))[0]))
  c = topk.num_candidates(N, K)
  top_c = np.sort(pre, axis=1)[:, -c:]
  cand_thresh = np.sort(top_c.reshape(-1))[-K * B]
  spill = int(np.sum(top_c[:, 0] >= cand_thresh))
  return spill, float(spill > topk.spill_buckets(B)[-1])


@pytest.mark.parametrize("aligned_rows,since,fraction", [(0, 0, 8), (5, 0, 8), (5, 10, 8), (24, 10, 8),
                                                          (24, 10, B + 1)])
def test_event_counts_match_brute_force(aligned_rows, since, fraction, monkeypatch):
  # fraction 8: spill allowances (16, 64, 128), so 24 rows take the 64-row bucket; B + 1: only 16, they go dense.
  monkeypatch.setattr(topk, "MAX_SPILL_FRACTION", fraction)
  assert topk.spill_buckets(B) == ((16, 64, 128) if fraction == 8 else (16,))
  params, x = _problem(aligned_rows)
  since_N = np.full((N,), since, np.int32)
  _, stats = jax.jit(lambda p, x, s: losses.sae_loss(p, x, s, K, "batchtopk", 16, 1 / 32))(
      params, jnp.asarray(x), jnp.asarray(since_N))
  spill, dense = _expected(params, x)
  if aligned_rows:
    assert spill >= aligned_rows // 2  # the construction really makes rows spill
  assert float(stats.spill_rows) == spill
  assert float(stats.dense_fallback) == dense
  if aligned_rows == 0 or aligned_rows > topk.spill_buckets(B)[-1]:  # both sides of the fallback are exercised
    assert dense == float(aligned_rows > 0)
  if aligned_rows > topk.SPILL_ROWS:
    assert dense == float(fraction > B)


def test_train_step_reports_events_per_sae():
  config = TrainConfig(d_model=D, width=64, k=4, meta_width=8, meta_k=2, batch_size=32)
  state = init_train_state(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, D))
  _, metrics = jax.jit(train_step)(state, x)
  for name in ("joint", "solo"):
    for key in ("spill_rows", "dense_fallback"):
      v = float(metrics[f"{name}/{key}"])
      assert 0.0 <= v <= (32 if key == "spill_rows" else 1.0)
