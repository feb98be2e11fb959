"""The meta SAE over the primary's decoder rows, and the decomposability penalty.

Legend: N = primary latents (the meta SAE's batch), D = d_model, M = meta latents.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import losses, optimizer, sae


class MetaRecon(NamedTuple):
  """Meta reconstruction of decoder rows; `recon_NxD` is mapped back to each row's own scale."""
  recon_NxD: jax.Array
  mse: jax.Array  # in standardised space, the meta SAE's own loss
  fired_M: jax.Array  # bool: meta latent fired on some row (advances the meta SAE's dead counter)


def meta_inputs(w_dec_NxD: jax.Array) -> jax.Array:
  """What the meta SAE trains on: the primary's decoder rows at unit norm, no gradient."""
  return jax.lax.stop_gradient(sae.normalize_rows(w_dec_NxD))


def reconstruct(meta_params: dict, w_NxD: jax.Array, meta_k: int) -> MetaRecon:
  out = sae.forward(meta_params, w_NxD, meta_k, "batchtopk")
  return MetaRecon(out.recon_BxD, jnp.mean((out.recon_std_BxD - out.xs_BxD) ** 2),
                   jnp.any(jax.lax.stop_gradient(out.acts_BxN) > 0, axis=0))


def reconstruct_frozen(meta_params: dict, w_NxD: jax.Array, meta_k: int) -> MetaRecon:
  """`reconstruct` without gradient, decoded over each row's C candidate slots (`losses.reconstruct`'s
  slot path) instead of the dense N x M x D product: the default ("stop") penalty's forward."""
  meta_params, w_NxD = jax.lax.stop_gradient((meta_params, w_NxD))
  xs, mean, std = sae.standardize(w_NxD)
  rec, _, _ = losses.reconstruct(meta_params, xs, meta_k, "batchtopk", None)
  recon_std = rec.recon_std_BxD
  return MetaRecon(sae.unstandardize(recon_std, mean, std), jnp.mean((recon_std - xs) ** 2), rec.active_N > 0)


def penalty(w_dec_NxD: jax.Array, meta_params: dict, meta_k: int, sigma_sq: float,
            mode: str = "stop") -> tuple[jax.Array, MetaRecon]:
  """mean_i exp(-||w_i - ŵ_i||² / σ²) with the meta SAE frozen.

  "stop" (the paper): ŵ is a constant, the gradient reaches W_dec only through w_i.
  "through": the gradient also flows through the meta SAE's encoding/decoding of w_i.
  """
  frozen = jax.lax.stop_gradient(meta_params)
  if mode == "stop":
    rec = reconstruct_frozen(frozen, w_dec_NxD, meta_k)
    w_hat_NxD = rec.recon_NxD
  elif mode == "through":
    rec = reconstruct(frozen, w_dec_NxD, meta_k)
    w_hat_NxD = rec.recon_NxD
  else:
    raise ValueError(f"unknown penalty mode {mode!r}; use 'stop' or 'through'")
  p_N = jnp.exp(-jnp.sum((w_dec_NxD - w_hat_NxD) ** 2, axis=-1) / sigma_sq)
  return jnp.mean(p_N), rec


def meta_loss(meta_params: dict, w_NxD: jax.Array, since_fired_M: jax.Array, meta_k: int, aux_k: int,
              aux_coeff: float, dead_after_batches: int = 5, auxk_detach: bool = False):
  """The meta SAE's own objective (MSE + AuxK) on decoder rows, never the penalty."""
  return losses.sae_loss(meta_params, w_NxD, since_fired_M, meta_k, "batchtopk", aux_k, aux_coeff,
                         dead_after_batches=dead_after_batches, auxk_detach=auxk_detach)


@functools.partial(jax.jit, static_argnames=("k", "steps", "lr", "aux_k", "aux_coeff", "dead_after_batches"))
def _fit(params, w_NxD, k, steps, lr, aux_k, aux_coeff, dead_after_batches):
  """`steps` full-batch updates of a meta SAE on fixed rows (compiled once per shape and settings)."""
  tx = optimizer.adam(lr)

  def step(carry, _):
    params, opt_state, since_M = carry
    grads, stats = jax.grad(meta_loss, has_aux=True)(params, w_NxD, since_M, k, aux_k, aux_coeff,
                                                     dead_after_batches)
    params, opt_state = optimizer.apply(tx, params, grads, opt_state)
    return (params, opt_state, stats.since_fired_N), None

  since_M = jnp.zeros((params["W_enc"].shape[1],), jnp.int32)
  (params, _, _), _ = jax.lax.scan(step, (params, tx.init(params), since_M), None, length=steps)
  return params


def train_meta_sae(w_NxD: np.ndarray, width: int, k: int, steps: int, lr: float = 3e-4,
                   seed: int = 0, aux_k: int = 512, aux_coeff: float = 1 / 32,
                   dead_after_batches: int = 5) -> dict:
  """Trains a fresh meta SAE on fixed rows (whole matrix as one batch); for evaluation."""
  w = meta_inputs(jnp.asarray(w_NxD, jnp.float32))
  params = sae.init_params(jax.random.PRNGKey(seed), w.shape[1], width)
  return jax.device_get(_fit(params, w, k, steps, lr, aux_k, aux_coeff, dead_after_batches))


def meta_fve(w_NxD: np.ndarray, params: dict, k: int) -> float:
  """Fraction of the variance of the (unit-norm) rows that the meta SAE explains."""
  w = meta_inputs(jnp.asarray(w_NxD, jnp.float32))
  rec = reconstruct(params, w, k).recon_NxD
  err = jnp.sum((w - rec) ** 2)
  var = jnp.sum((w - jnp.mean(w, axis=0)) ** 2)
  return float(1.0 - err / var)
