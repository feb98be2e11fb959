"""The pure joint train_step: unit-norm decoders, λ₂ = 0 equivalence, jit, purity, schedule, the API."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metasae_jax
from metasae_jax.core import optimizer

CFG = metasae_jax.TrainConfig(d_model=32, width=128, k=4, meta_width=12, meta_k=2, lambda2=0.3,
                              sigma_sq=1.0, batch_size=256, seed=0, n_primary_steps=3, n_meta_steps=2)


def _batch(i, cfg=CFG):
  return jax.random.normal(jax.random.PRNGKey(100 + i), (cfg.batch_size, cfg.d_model))


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_config_validation_names_the_field():
  with pytest.raises(metasae_jax.UserError, match="meta_k"):
    dataclasses.replace(CFG, meta_k=12)
  with pytest.raises(metasae_jax.UserError, match="sigma_sq"):
    dataclasses.replace(CFG, sigma_sq=0.0)
  # The paper's 1800 meta latents at width 20480, scaled: round(width * 1800 / 20480).
  assert metasae_jax.TrainConfig(d_model=8, width=20480).meta_width == 1800
  assert metasae_jax.TrainConfig(d_model=8, width=1000).meta_width == 88  # 87.89
  assert metasae_jax.TrainConfig(d_model=8, width=9216).meta_width == 810


def test_decoder_rows_unit_norm_after_steps():
  state = metasae_jax.init_train_state(CFG)
  step = jax.jit(metasae_jax.train_step)
  for i in range(4):
    state, _ = step(state, _batch(i))
  for params in (state.joint.params, state.solo.params, state.meta.params):
    np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=1), 1.0, atol=1e-6)
    assert float(jnp.abs(params["b_enc"]).max()) == 0.0


def test_radial_gradient_component_removed():
  rng = jax.random.split(jax.random.PRNGKey(0), 2)
  w = jax.random.normal(rng[0], (16, 8))
  w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
  g = jax.random.normal(rng[1], (16, 8))
  p = optimizer.remove_radial(g, w)
  np.testing.assert_allclose(jnp.sum(p * w, axis=1), 0.0, atol=1e-6)
  np.testing.assert_allclose(p + jnp.sum(g * w, 1, keepdims=True) * w, g, atol=1e-6)


def test_lambda_zero_joint_and_solo_identical_step_for_step():
  cfg = dataclasses.replace(CFG, lambda2=0.0)
  state = metasae_jax.init_train_state(cfg)
  step = jax.jit(metasae_jax.train_step)
  for i in range(5):
    state, m = step(state, _batch(i))
    assert _tree_equal(state.joint.params, state.solo.params)
    assert float(m["joint/mse"]) == float(m["solo/mse"])


def test_penalty_makes_joint_differ_from_solo():
  state = metasae_jax.init_train_state(CFG)
  state, m = jax.jit(metasae_jax.train_step)(state, _batch(0))
  assert not _tree_equal(state.joint.params, state.solo.params)
  assert float(m["penalty"]) > 0


def test_jit_and_no_jit_agree():
  state = metasae_jax.init_train_state(CFG)
  a, ma = state, None
  b, mb = state, None
  for i in range(CFG.n_primary_steps + 1):  # crosses one meta phase
    a, ma = metasae_jax.train_step(a, _batch(i))
    b, mb = jax.jit(metasae_jax.train_step)(b, _batch(i))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
  for key in ma:
    np.testing.assert_allclose(ma[key], mb[key], rtol=2e-5, atol=2e-6)


def test_train_step_is_pure():
  state = metasae_jax.init_train_state(CFG)
  before = jax.tree.map(np.array, state)
  step = jax.jit(metasae_jax.train_step)
  s1, m1 = step(state, _batch(0))
  s2, m2 = step(state, _batch(0))
  assert _tree_equal(jax.tree.map(np.array, state), before)
  assert _tree_equal(s1, s2)
  assert _tree_equal(m1, m2)


def test_meta_sae_trains_only_on_schedule():
  state = metasae_jax.init_train_state(CFG)
  step = jax.jit(metasae_jax.train_step)
  meta0 = state.meta.params
  for i in range(CFG.n_primary_steps - 1):
    state, _ = step(state, _batch(i))
    assert _tree_equal(state.meta.params, meta0)
  state, _ = step(state, _batch(CFG.n_primary_steps))
  assert not _tree_equal(state.meta.params, meta0)
  assert int(state.meta.opt_state[0].count) == CFG.n_meta_steps


def test_five_line_api_lowers_the_loss():
  from metasae_jax.storage import synthetic
  x = jnp.asarray(synthetic.sparse_activations(2048, 32, num_features=64, seed=0))
  config = metasae_jax.TrainConfig(d_model=32, width=128, k=4, meta_width=12, meta_k=2, lambda2=0.3,
                                   sigma_sq=1.0, batch_size=256, seed=0, lr=3e-3)
  state = metasae_jax.init_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(metasae_jax.train_step)
  losses = []
  for i in range(40):
    state, metrics = step(state, x[(i % 8) * 256:(i % 8 + 1) * 256])
    losses.append(float(metrics["joint/mse"]))
  assert np.mean(losses[-5:]) < 0.7 * losses[0]
