"""The straightforward implementation the fast paths are measured and tested against.

Legend: B = batch, D = d_model, N = latents, M = meta latents.
Each architecture's `naive_forward` (dense decoder matmul, BatchTopK by a
flattened top-(k*B) over the whole B x N matrix), (x' - b_dec) W_enc as written, AuxK at full width, the meta SAE run on all
N decoder rows every step for the penalty, joint and solo as separate jitted steps.
Same math as `train_step`; only the cost differs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from metasae_jax.core import architectures, meta, optimizer, sae, topk
from metasae_jax.core.architectures import base
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.train_step import SAEState, TrainState


def _forward(params, x_BxD, k, compute_dtype="float32"):
  xs, mean, std = sae.standardize(x_BxD)
  pre = jax.nn.relu(sae.matmul(xs - params["b_dec"], params["W_enc"], compute_dtype))
  acts = topk.batchtopk_reference(pre, k)
  recon_std = sae.matmul(acts, params["W_dec"], compute_dtype) + params["b_dec"]
  return xs, pre, acts, recon_std, mean, std


def _penalty(w_dec_NxD, meta_params, config: TrainConfig, compute_dtype):
  """mean_i exp(-||w_i - ŵ_i||² / σ²) from the frozen meta SAE's dense forward over all N rows."""
  frozen = jax.lax.stop_gradient(meta_params)
  w = w_dec_NxD if config.penalty_grad == "through" else jax.lax.stop_gradient(w_dec_NxD)
  _, _, acts, recon_std, mean, std = _forward(frozen, w, config.meta_k, compute_dtype)
  w_hat = sae.unstandardize(recon_std, mean, std)
  if config.penalty_grad != "through":
    w_hat = jax.lax.stop_gradient(w_hat)
  pen = jnp.mean(jnp.exp(-jnp.sum((w_dec_NxD - w_hat) ** 2, axis=-1) / config.sigma_sq))
  return pen, jnp.any(acts > 0, axis=0)


def loss(params, x_BxD, since_fired_N, config: TrainConfig, meta_params, lambda2):
  """Primary loss (MSE + AuxK + λ₂ · penalty); aux = (updated dead counter, meta latents fired or None)."""
  dtype = config.resolved("cpu")[1]
  arch = architectures.get(config.architecture)
  xs, _, _ = sae.standardize(x_BxD)
  pre, acts, recon_std, own_loss, _ = arch.naive_forward(params, xs, config.k, base.Options.of(config), dtype)
  # The reference: count this batch, then test; the AuxK target keeps its gradient unless detached.
  since = jnp.where(jnp.sum(acts > 0, axis=0) > 0, 0, since_fired_N + 1)
  dead_N = since >= config.dead_after_batches
  residual = xs - recon_std
  if config.auxk_detach:
    residual = jax.lax.stop_gradient(residual)
  masked = jnp.where(dead_N, pre, 0.0)
  aux_acts = topk.topk_per_token(masked, min(config.aux_k, pre.shape[-1]))
  aux_recon = sae.matmul(aux_acts, params["W_dec"], dtype)
  aux = jnp.where(jnp.any(dead_N), jnp.mean((aux_recon - residual) ** 2), 0.0)
  total = own_loss + (config.aux_coeff * aux if arch.spec.auxk else 0.0)
  fired_M = None
  if lambda2:
    pen, fired_M = _penalty(params["W_dec"], meta_params, config, dtype)
    total = total + lambda2 * pen
  return total, (since, fired_M)


def _update(s: SAEState, x_BxD, config, meta_params, lambda2):
  grads, (since, fired_M) = jax.grad(loss, has_aux=True)(s.params, x_BxD, s.since_fired, config, meta_params,
                                                         lambda2)
  params, opt = optimizer.apply(optimizer.adam(config.lr, config.b1, config.b2), s.params, grads, s.opt_state,
                                train_b_enc=architectures.get(config.architecture).trains_b_enc)
  return SAEState(params, opt, since), fired_M


@functools.partial(jax.jit, donate_argnums=0)
def joint_step(state: TrainState, x_BxD):
  """Primary update with the penalty (meta SAE evaluated on all rows, every step)."""
  c = state.config
  joint, fired_M = _update(state.joint, x_BxD.astype(jnp.float32), c, state.meta.params, c.lambda2)
  m = state.meta
  if fired_M is not None:  # the penalty's meta forward advances the meta SAE's dead counter
    m = m.replace(since_fired=jnp.where(fired_M, 0, m.since_fired + 1))
  return state.replace(joint=joint, meta=m, step=state.step + 1)


@functools.partial(jax.jit, donate_argnums=0)
def solo_step(state: TrainState, x_BxD):
  return state.replace(solo=_update(state.solo, x_BxD.astype(jnp.float32), state.config, None, 0.0)[0])


@functools.partial(jax.jit, donate_argnums=0)
def meta_step(state: TrainState):
  """One meta SAE update on the current decoder rows (the caller loops n_meta_steps times)."""
  c = state.config
  w = meta.meta_inputs(state.joint.params["W_dec"])
  m = state.meta
  grads, (since, _) = jax.grad(_meta_loss, has_aux=True)(m.params, w, m.since_fired, c)
  params, opt = optimizer.apply(optimizer.adam(c.lr, c.b1, c.b2), m.params, grads, m.opt_state)
  return state.replace(meta=SAEState(params, opt, since))


def _meta_loss(params, w_NxD, since_fired_M, c: TrainConfig):
  """The meta SAE's MSE + AuxK, written out like `loss` (dense, full-width AuxK)."""
  meta_c = dataclasses.replace(c, k=c.meta_k, architecture="batchtopk", matryoshka_widths=(), algorithm="auto")
  return loss(params, w_NxD, since_fired_M, meta_c, None, 0.0)


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
