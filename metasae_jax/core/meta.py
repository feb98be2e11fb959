"""The meta SAE over the primary's decoder rows, and the decomposability penalty.

Legend: N = primary latents (the meta SAE's batch), R = this device's share of them, D = d_model,
M = meta latents.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import dense, losses, optimizer, sae, slots
from metasae_jax.core.axes import Axes


class MetaRecon(NamedTuple):
  """Meta reconstruction of (this device's) decoder rows; `recon_NxD` is mapped back to each row's own scale."""
  recon_NxD: jax.Array
  mse: jax.Array  # in standardised space, the meta SAE's own loss (mean over every device's rows)
  fired_M: jax.Array  # bool: meta latent fired on some row of any device (advances the meta SAE's dead counter)


def row_axes(axis_name=None) -> Axes:
  """The meta SAE's axes given the primary's: its batch (the decoder rows) is split over all of them."""
  axes = Axes.of(axis_name)
  return Axes(axes.all)


def local_rows(w_NxD: jax.Array, axis_name=None) -> jax.Array:
  """This device's share of the decoder rows it holds: rows split over the primary's batch axes.

  A device holds the rows of its latent shard (all N without a latent axis);
  the devices along the batch axes each take an equal slice of them, so the
  meta SAE's per-device work falls with the device count.
  """
  axes = Axes.of(axis_name)
  if not axes.batch:
    return w_NxD
  n, shards = w_NxD.shape[0], axes.batch_shards()
  if n % shards:
    raise ValueError(f"the meta SAE splits the {n} decoder rows on each device over {shards} devices along "
                     f"{axes.batch}; use a width divisible by the device count")
  rows = n // shards
  return jax.lax.dynamic_slice_in_dim(w_NxD, axes.batch_index() * rows, rows)


def meta_inputs(w_dec_NxD: jax.Array) -> jax.Array:
  """What the meta SAE trains on: the primary's decoder rows at unit norm, no gradient."""
  return jax.lax.stop_gradient(sae.normalize_rows(w_dec_NxD))


def _recon(out_std_BxD, xs_BxD, mean, std, active_M, axes: Axes) -> MetaRecon:
  mse = jnp.mean(jax.lax.stop_gradient((out_std_BxD - xs_BxD) ** 2))
  if axes.batch:
    mse = jax.lax.pmean(mse, axes.batch)
  return MetaRecon(sae.unstandardize(out_std_BxD, mean, std), mse, axes.psum_batch(active_M) > 0)


def reconstruct(meta_params: dict, w_NxD: jax.Array, meta_k: int, axis_name=None, path: str = "dense",
                compute_dtype: str = "float32") -> MetaRecon:
  """Meta reconstruction of rows, differentiable in the rows and the meta params.

  `axis_name`: the meta SAE's own axes (rows split over them, `row_axes`).
  "dense" is differentiable in the rows too (the "through" penalty); the slot
  path supplies gradients for the meta params only.
  """
  axes = Axes.of(axis_name)
  xs, mean, std = sae.standardize(w_NxD)
  if path == "dense":
    rec, _ = dense.reconstruct(meta_params, xs, meta_k, "batchtopk", axes, compute_dtype)
  else:
    rec, _, _ = slots.reconstruct(meta_params, xs, meta_k, "batchtopk", axes, compute_dtype)
  return _recon(rec.recon_std_BxD, xs, mean, std, rec.active_N, axes)


def penalty_sum(w_dec_NxD: jax.Array, meta_params: dict, meta_k: int, sigma_sq: float, mode: str = "stop",
                axis_name=None, path: str = "slots", compute_dtype: str = "float32") -> tuple[jax.Array, MetaRecon]:
  """Σ_i exp(-||w_i - ŵ_i||² / σ²) over this device's share of the rows (`local_rows`), summed over the
  latent axis; the meta SAE is frozen. `axis_name`: the primary's axes.

  "stop" (the paper): ŵ is a constant, the gradient reaches W_dec only through w_i.
  "through": the gradient also flows through the meta SAE's encoding/decoding of w_i.
  The sum stays per-device along the batch axes: the caller's gradient sum
  over them adds every device's rows once.
  """
  axes = Axes.of(axis_name)
  frozen = jax.lax.stop_gradient(meta_params)
  w_RxD = local_rows(w_dec_NxD, axes)
  if mode == "stop":
    rec = reconstruct(frozen, jax.lax.stop_gradient(w_RxD), meta_k, row_axes(axes), path, compute_dtype)
    w_hat_RxD = jax.lax.stop_gradient(rec.recon_NxD)
  elif mode == "through":
    rec = reconstruct(frozen, w_RxD, meta_k, row_axes(axes), "dense", compute_dtype)
    w_hat_RxD = rec.recon_NxD
  else:
    raise ValueError(f"unknown penalty mode {mode!r}; use 'stop' or 'through'")
  p_R = jnp.exp(-jnp.sum((w_RxD - w_hat_RxD) ** 2, axis=-1) / sigma_sq)
  return axes.psum_latent(jnp.sum(p_R)), rec


def penalty(w_dec_NxD: jax.Array, meta_params: dict, meta_k: int, sigma_sq: float,
            mode: str = "stop") -> tuple[jax.Array, MetaRecon]:
  """mean_i exp(-||w_i - ŵ_i||² / σ²) on one device (the paper's penalty)."""
  total, rec = penalty_sum(w_dec_NxD, meta_params, meta_k, sigma_sq, mode)
  return total / w_dec_NxD.shape[0], rec


def meta_loss(meta_params: dict, w_NxD: jax.Array, since_fired_M: jax.Array, meta_k: int, aux_k: int,
              aux_coeff: float, dead_after_batches: int = 5, auxk_detach: bool = False, axis_name=None,
              path: str = "slots", compute_dtype: str = "float32"):
  """The meta SAE's own objective (MSE + AuxK) on (this device's) decoder rows, never the penalty.

  `axis_name`: the meta SAE's axes (`row_axes`).
  """
  return losses.sae_loss(meta_params, w_NxD, since_fired_M, meta_k, "batchtopk", aux_k, aux_coeff,
                         dead_after_batches=dead_after_batches, auxk_detach=auxk_detach,
                         compute_dtype=compute_dtype, axis_name=axis_name, path=path)


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
