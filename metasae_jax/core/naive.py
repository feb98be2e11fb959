"""The straightforward implementation the fast paths are measured and tested against.

Legend: B = batch, D = d_model, N = latents, M = meta latents.
Dense decoder matmul, BatchTopK by a flattened top-(k*B) over the whole B x N
matrix, (x' - b_dec) W_enc as written, AuxK at full width, the meta SAE run on all
N decoder rows every step for the penalty, joint and solo as separate jitted steps.
Same math as `train_step`; only the cost differs.
"""

import functools

import jax
import jax.numpy as jnp

from metasae_jax.core import meta, optimizer, sae, topk
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.train_step import SAEState, TrainState


def _forward(params, x_BxD, k):
  xs, mean, std = sae.standardize(x_BxD)
  pre = jax.nn.relu((xs - params["b_dec"]) @ params["W_enc"])
  acts = topk.batchtopk_reference(pre, k)
  recon_std = acts @ params["W_dec"] + params["b_dec"]
  return xs, pre, acts, recon_std


def _loss(params, x_BxD, dead_N, config: TrainConfig, meta_params, lambda2):
  xs, pre, acts, recon_std = _forward(params, x_BxD, config.k)
  mse = jnp.mean((recon_std - xs) ** 2)
  residual = jax.lax.stop_gradient(xs - recon_std)
  masked = jnp.where(dead_N, pre, 0.0)
  aux_acts = topk.topk_per_token(masked, min(config.aux_k, pre.shape[-1]))
  aux = jnp.where(jnp.any(dead_N), jnp.mean((aux_acts @ params["W_dec"] - residual) ** 2), 0.0)
  loss = mse + config.aux_coeff * aux
  if lambda2:
    pen, _ = meta.penalty(params["W_dec"], meta_params, config.meta_k, config.sigma_sq, config.penalty_grad)
    loss = loss + lambda2 * pen
  return loss, jnp.sum(acts > 0, axis=0) > 0


def _update(s: SAEState, x_BxD, config, meta_params, lambda2):
  grads, fired = jax.grad(_loss, has_aux=True)(s.params, x_BxD, s.since_fired >= config.dead_after_batches,
                                               config, meta_params, lambda2)
  params, opt = optimizer.apply(optimizer.adam(config.lr, config.b1, config.b2), s.params, grads, s.opt_state)
  return SAEState(params, opt, jnp.where(fired, 0, s.since_fired + 1))


@functools.partial(jax.jit, donate_argnums=0)
def joint_step(state: TrainState, x_BxD):
  """Primary update with the penalty (meta SAE evaluated on all rows, every step)."""
  c = state.config
  return state.replace(joint=_update(state.joint, x_BxD.astype(jnp.float32), c, state.meta.params, c.lambda2),
                       step=state.step + 1)


@functools.partial(jax.jit, donate_argnums=0)
def solo_step(state: TrainState, x_BxD):
  return state.replace(solo=_update(state.solo, x_BxD.astype(jnp.float32), state.config, None, 0.0))


@functools.partial(jax.jit, donate_argnums=0)
def meta_step(state: TrainState):
  """One meta SAE update on the current decoder rows (the caller loops n_meta_steps times)."""
  c = state.config
  w = meta.meta_inputs(state.joint.params["W_dec"])
  m = state.meta
  grads, stats = jax.grad(meta.meta_loss, has_aux=True)(m.params, w, m.since_fired >= c.dead_after_batches,
                                                        c.meta_k, c.aux_k, c.aux_coeff)
  params, opt = optimizer.apply(optimizer.adam(c.lr, c.b1, c.b2), m.params, grads, m.opt_state)
  return state.replace(meta=SAEState(params, opt, jnp.where(stats.fired_N, 0, m.since_fired + 1)))


def run_steps(state: TrainState, batches) -> TrainState:
  """Joint, solo and the scheduled meta phase, step by step from Python."""
  for x in batches:
    state = joint_step(state, x)
    if state.solo is not None:
      state = solo_step(state, x)
    if state.config.lambda2 > 0 and int(state.step) % state.config.n_primary_steps == 0:
      for _ in range(state.config.n_meta_steps):
        state = meta_step(state)
  return state
