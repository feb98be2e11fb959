"""The fast train_step agrees with the straightforward implementation (values and updates)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metasae_jax
from metasae_jax.core import losses, naive, slots, topk
from metasae_jax.storage import synthetic

# width 1280: wide enough for the sparse slot path (num_candidates * SPARSE_MIN_RATIO <= width).
CFG = metasae_jax.TrainConfig(d_model=16, width=1280, k=4, meta_width=8, meta_k=2, batch_size=128, seed=0,
                              n_primary_steps=3, n_meta_steps=2, lr=1e-3, dead_after_batches=2)


def _batches(n):
  x = synthetic.sparse_activations(n * 128, 16, num_features=40, seed=1)
  return [jnp.asarray(x[i * 128:(i + 1) * 128]) for i in range(n)]


# meta_width 320: the meta SAE's C = 34 slots are a small enough fraction of its width that it takes
# the slot path too (8: dense).
@pytest.mark.parametrize("auxk_detach,meta_width", [(False, 8), (True, 8), (False, 320)])
def test_fast_step_matches_naive_over_meta_phases_and_dead_latents(auxk_detach, meta_width):
  cfg = dataclasses.replace(CFG, auxk_detach=auxk_detach, meta_width=meta_width)
  c = topk.num_candidates(meta_width, cfg.meta_k)
  assert (c * slots.SPARSE_MIN_RATIO <= meta_width) == (meta_width == 320)
  batches = _batches(7)
  fast = metasae_jax.init_train_state(cfg)
  step = jax.jit(metasae_jax.train_step)
  dead_seen = 0.0
  for x in batches:
    fast, m = step(fast, x)
    dead_seen = max(dead_seen, float(m["joint/dead_fraction"]))
  slow = naive.run_steps(metasae_jax.init_train_state(cfg), batches)
  assert dead_seen > 0  # the AuxK path was exercised
  for a, b in ((fast.joint, slow.joint), (fast.solo, slow.solo), (fast.meta, slow.meta)):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), a.params, b.params)
    np.testing.assert_array_equal(a.since_fired, b.since_fired)


def test_fast_and_naive_gradients_agree_in_through_mode():
  cfg = dataclasses.replace(CFG, penalty_grad="through")
  x = _batches(1)[0]
  state = metasae_jax.init_train_state(cfg)
  fast, _ = jax.jit(metasae_jax.train_step)(state, x)
  slow = naive.run_steps(metasae_jax.init_train_state(cfg), [x])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), fast.joint.params,
               slow.joint.params)
