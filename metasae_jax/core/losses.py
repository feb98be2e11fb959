"""SAE training losses: reconstruction MSE, AuxK over dead latents, batch metrics.

Legend: B = batch (rows on this device), D = input dim, N = latents (on this device).
The architecture (core/architectures/) gives the reconstruction and its own
terms; this module adds AuxK and the statistics. Two algorithms compute the
same loss. "slots" (the CPU's, `slots.py`): the selection comes from each row's
C candidate slots and the decoder, AuxK and their gradients run over slots
(native kernels). "dense" (GPU/TPU, `dense.py`): thresholds by bisection and
masked dense products. `axis_name` is anything `Axes.of` takes;
with a latent axis, partial decodes are summed over it.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax.core import architectures, dense, native, sae, sparse, topk
from metasae_jax.core.architectures import base
from metasae_jax.core.axes import Axes

PATHS = ("slots", "dense")


class SAELoss(NamedTuple):
  """Loss pieces and batch statistics of one SAE forward (everything a scalar but since_fired_N)."""
  mse: jax.Array
  aux: jax.Array
  fvu: jax.Array
  l0: jax.Array
  since_fired_N: jax.Array  # int32: batches since each latent fired, this (global) batch included
  # Slow-path events of this step (scalars, float32 so they average like the rest): rows whose
  # selected entries spilled past their candidate slots, and whether the decoder fell back to dense
  # (more spilling rows than the largest allowance). Always 0 on the dense path.
  spill_rows: jax.Array = 0.0
  dense_fallback: jax.Array = 0.0
  terms: dict = {}  # the architecture's named loss terms (scalars, this device's rows)


def auxk_loss(pre_BxN: jax.Array, dead_N: jax.Array, w_dec_NxD: jax.Array, residual_BxD: jax.Array,
              aux_k: int, detach: bool = False) -> jax.Array:
  """MSE of reconstructing the residual from each token's top aux_k dead latents.

  `detach=False` is the paper's reference (the residual target keeps its
  gradient, so AuxK also trains the main reconstruction); True is OpenAI's TopK
  recipe (the target is a constant). Differentiable in all four arrays.
  """
  return _auxk(pre_BxN, lambda idx_BxK, _: jnp.take_along_axis(pre_BxN, idx_BxK, axis=1), dead_N, w_dec_NxD,
               residual_BxD, aux_k, detach)


def _auxk(pre_BxN, slot_values, dead_N, w_dec_NxD, residual_BxD, aux_k, detach, compute_dtype="float32",
          axes: Axes = Axes()):
  """AuxK over each token's top aux_k dead latents as K = min(aux_k, N) slots per token.

  `pre_BxN` gives the values (the selection takes no gradient); `slot_values(idx_BxK,
  top_BxK)` gives the chosen slots' values (`top_BxK`, gradient-free) with their gradient. The decoder and
  all gradients run over the B*K slots (`sparse.slot_decode`; native kernels on
  CPU), not over B x N or B x (dead) matrices, so the cost does not grow with the
  dead count. Only positive dead entries are chosen; when a token has fewer than
  K, the extra slots hold zeros and contribute nothing: the reference's
  min(aux_k, #dead) (its extra picks are zeros too). With a latent axis each
  device picks among its own latents and the row's threshold over all devices'
  picks (a per-row bisection) decides which stay.
  """
  n = dead_N.shape[0]
  target_BxD = jax.lax.stop_gradient(residual_BxD) if detach else residual_BxD
  top_BxK, idx_BxK = native.row_top_k_masked(pre_BxN, dead_N, min(aux_k, n))
  keep_BxK = top_BxK > 0
  if axes.latent:
    t_B = topk.row_kth_largest(top_BxK, min(aux_k, n * axes.latent_shards()), axes.latent)
    keep_BxK &= top_BxK >= t_B[:, None]
  vals_BxK = jnp.where(keep_BxK, slot_values(idx_BxK, top_BxK), 0.0)
  recon_BxD = axes.psum_latent(sparse.slot_decode(vals_BxK, idx_BxK, w_dec_NxD, compute_dtype))
  return jnp.mean((recon_BxD - target_BxD) ** 2)


def sae_auxk(params: dict, xs_BxD: jax.Array, pre_BxN: jax.Array, dead_N: jax.Array, residual_BxD: jax.Array,
             aux_k: int, detach: bool = False, compute_dtype: str = "float32", axis_name=None) -> jax.Array:
  """AuxK of an SAE over slots, differentiable in its params, reusing the encoder pass's values `pre_BxN`."""

  def slot_values(idx_BxK, top_BxK):  # the selected values again, with their (slot-sparse) gradient
    return sparse.slot_pre(top_BxK, idx_BxK, xs_BxD, params["W_enc"], params["b_dec"], params["b_enc"],
                           compute_dtype)

  return _auxk(pre_BxN, slot_values, dead_N, params["W_dec"], residual_BxD, aux_k, detach, compute_dtype,
               Axes.of(axis_name))


def sae_loss(params: dict, x_BxD: jax.Array, since_fired_N: jax.Array, k: int, architecture: str, aux_k: int,
             aux_coeff: float, *, options=None, dead_after_batches: int = 5, auxk_detach: bool = False,
             compute_dtype: str = "float32", axis_name=None, path: str = "slots") -> tuple[jax.Array, SAELoss]:
  """The architecture's loss on standardised inputs (its reconstruction MSE and own terms) + aux_coeff * AuxK
  over the latents dead after this batch, where the architecture has AuxK.

  `since_fired_N` counts batches since each latent last fired, before this one.
  As in the reference, this batch is counted first (a latent that fires now is
  not dead) and then latents at >= dead_after_batches feed AuxK; the updated
  counter comes back in the stats. `path` is the algorithm ("slots" or
  "dense"); the loss is the same. MSE and AuxK are this device's rows' means
  (the caller averages over the batch axes); statistics cover the global batch.
  `options`: the architecture's hyperparameters (`architectures.base.Options`).
  """
  if path not in PATHS:
    raise ValueError(f"unknown path {path!r}; use one of {PATHS}")
  arch = architectures.get(architecture)
  if path not in arch.spec.algorithms:
    raise ValueError(f"{architecture} has no {path!r} algorithm; it runs {arch.spec.algorithms}")
  options = options if options is not None else base.Options()
  axes = Axes.of(axis_name)
  xs, mean, std = sae.standardize(x_BxD)
  fwd = arch.train_forward(params, xs, k, options, axes, path, compute_dtype)
  rec, pre_BxN, events = fwd.recon, fwd.pre_BxN, fwd.events
  since_N = update_since_fired(since_fired_N, axes.psum_batch(rec.active_N) > 0)
  dead_N = since_N >= dead_after_batches
  residual = xs - rec.recon_std_BxD

  def aux_fn():
    if path == "dense":
      return dense.auxk(params, pre_BxN, dead_N, residual, aux_k, auxk_detach, compute_dtype, axes)
    return sae_auxk(params, xs, pre_BxN, dead_N, residual, aux_k, auxk_detach, compute_dtype, axes)

  if arch.spec.auxk:
    # The predicate is the same on every device (dead latents live on all latent shards' counts), so
    # every device takes the branch and its collectives together.
    any_dead = axes.psum_latent(jnp.sum(dead_N, dtype=jnp.int32)) > 0
    # zeros_like, not zeros: under shard_map both branches must vary over the axes alike.
    aux = jax.lax.cond(any_dead, aux_fn, lambda: jnp.zeros_like(fwd.mse))
  else:
    aux = jnp.zeros_like(fwd.mse)
  x = jax.lax.stop_gradient(x_BxD)
  recon = sae.unstandardize(jax.lax.stop_gradient(rec.recon_std_BxD), mean, std)
  # FVU over the (global) batch, in the input's own space.
  count = x.shape[0] * axes.batch_shards()
  mean_D = axes.psum_batch(jnp.sum(x, axis=0)) / count
  err = axes.psum_batch(jnp.sum((x - recon) ** 2))
  var = axes.psum_batch(jnp.sum((x - mean_D) ** 2))
  l0 = axes.psum_all(rec.l0_sum.astype(jnp.float32)) / count
  stats = SAELoss(mse=fwd.mse, aux=aux, fvu=err / var, l0=l0, since_fired_N=since_N,
                  spill_rows=axes.psum_all(events.spill_rows).astype(jnp.float32),
                  dense_fallback=events.dense.astype(jnp.float32), terms=fwd.terms)
  return fwd.mse + fwd.extra + aux_coeff * aux, stats


def update_since_fired(since_fired_N: jax.Array, fired_N: jax.Array) -> jax.Array:
  """Counts batches since each latent last fired (reset to 0 when it fires)."""
  return jnp.where(fired_N, 0, since_fired_N + 1)
