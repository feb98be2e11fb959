"""The opt-in bfloat16 compute path: trains like float32, keeps float32 state, no host callbacks.

Tolerance: on the same data, init and batches, the bf16 run's standardised MSE
on held-out tokens is within 2 % of the float32 run's. bf16 keeps 8 mantissa
bits (relative rounding 2^-9 ≈ 0.2 %) on the matmul inputs only; products
accumulate in float32 and the weights, Adam moments and losses stay float32, so
the runs differ by per-step rounding noise of ~0.1-1 % in the pre-activations
(which can flip a BatchTopK selection near the threshold) rather than by a
drift. 2 % is the issue's target, an order of magnitude above that noise at
the loss level and far below the gap between training and not (checked too).
"""

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

import metasae_jax
from metasae_jax.core import sae
from metasae_jax.storage import store, synthetic

CFG = metasae_jax.TrainConfig(d_model=32, width=512, k=4, meta_width=24, meta_k=2, batch_size=256, seed=0,
                              n_primary_steps=5, n_meta_steps=2, lr=2e-3)
STEPS = 80


def _standardised_mse(params, x):
  out = sae.forward(params, x, CFG.k)  # evaluated in float32 for both runs
  return float(jnp.mean((out.recon_std_BxD - out.xs_BxD) ** 2))


def _train(cfg, batches):
  step = jax.jit(metasae_jax.train_step)
  state = metasae_jax.init_train_state(cfg)
  for x in batches:
    state, _ = step(state, x)
  return state


def test_bf16_trains_within_two_percent_of_float32(tmp_path):
  s = synthetic.write_sparse_store(str(tmp_path / "store"), (STEPS + 8) * CFG.batch_size, CFG.d_model,
                                   seed=3, num_features=64, shard_tokens=8192)
  acts = store.open_store(s.path).read_acts(0, s.num_tokens)
  b = CFG.batch_size
  batches = [jnp.asarray(acts[i * b:(i + 1) * b]) for i in range(STEPS)]
  heldout = jnp.asarray(acts[STEPS * b:])
  bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
  f32_state, bf16_state = _train(CFG, batches), _train(bf16, batches)

  # Master weights, Adam state and counters keep their dtypes.
  for leaf in jax.tree.leaves((bf16_state.joint, bf16_state.solo, bf16_state.meta)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  start = _standardised_mse(metasae_jax.init_train_state(CFG).joint.params, heldout)
  f32, low = _standardised_mse(f32_state.joint.params, heldout), _standardised_mse(bf16_state.joint.params,
                                                                                    heldout)
  assert f32 < 0.5 * start  # training did something, so 2 % of it is a meaningful bar
  assert abs(low - f32) <= 0.02 * f32, (low, f32)
  solo_f32, solo_low = (_standardised_mse(f32_state.solo.params, heldout),
                        _standardised_mse(bf16_state.solo.params, heldout))
  assert abs(solo_low - solo_f32) <= 0.02 * solo_f32, (solo_low, solo_f32)
  # The path really ran in bf16: the weights differ from the float32 run's.
  assert float(jnp.max(jnp.abs(f32_state.joint.params["W_enc"] - bf16_state.joint.params["W_enc"]))) > 1e-4


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (cond, loops, custom rules, pjit) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def _dots(cfg, x):
  closed = jax.make_jaxpr(metasae_jax.train_step)(metasae_jax.init_train_state(cfg), x)
  eqns = list(_eqns(closed.jaxpr))
  assert not [e for e in eqns if "callback" in e.primitive.name]  # nothing stalls on the host
  return [e for e in eqns if e.primitive.name == "dot_general"]


def test_bf16_step_casts_matmul_inputs_and_accumulates_in_float32():
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16", width=2048)  # 2048: the sparse slot path too
  x = jnp.asarray(synthetic.sparse_activations(cfg.batch_size, cfg.d_model, num_features=64, seed=0))
  low = [e for e in _dots(cfg, x) if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  assert low
  for e in low:  # bf16 inputs always accumulate to a float32 result
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars)
    assert e.params["preferred_element_type"] == jnp.float32 and e.outvars[0].aval.dtype == jnp.float32
  # The encoder's B x D x N product is among them; the float32 path has no bf16 product at all.
  assert any(e.outvars[0].aval.shape == (cfg.batch_size, cfg.width) for e in low)
  f32 = _dots(dataclasses.replace(cfg, compute_dtype="float32"), x)
  assert f32 and all(v.aval.dtype == jnp.float32 for e in f32 for v in e.invars)
