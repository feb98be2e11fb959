"""SAE training losses: reconstruction MSE, AuxK over dead latents, batch metrics.

Legend: B = batch (rows on this device), D = input dim, N = latents (on this device).
Two algorithms compute the same loss. "slots" (the CPU's): the selection comes
from each row's C candidate slots and the decoder, AuxK and their gradients run
over slots (native kernels). "dense" (GPU/TPU, `dense.py`): thresholds by
bisection and masked dense products. `axis_name` is anything `Axes.of` takes;
with a latent axis, partial decodes are summed over it.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax.core import dense, native, sae, sparse, topk
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


# The slot path pays off when slots per token are a small fraction of the latents.
# Measured on 2 CPU cores with the native slot kernels: the meta SAE (C 40 of N 830,
# 9216 rows) runs its 5-step phase in 1.05-1.2 s over slots vs 2.36 s dense; the
# primary (C 128 of N 9216) decoder + gradients 0.12 s vs ~1.5 s dense.
SPARSE_MIN_RATIO = 8


class _Events(NamedTuple):
  spill_rows: jax.Array  # rows past their slots (this device)
  dense: jax.Array  # bool: the dense fallback ran


def reconstruct(params: dict, xs_BxD: jax.Array, k: int, activation: str, axis_name=None,
                compute_dtype: str = "float32"):
  """The SAE's reconstruction with gradient: over the C candidate slots per token (`sparse.slot_decode`;
  spilling rows exactly on the side), dense when more rows spill than the largest allowance or the slots
  are not a small fraction of the width. Returns (Recon, gradient-free pre-activations, events)."""
  axes = Axes.of(axis_name)
  pre_BxN = jax.lax.stop_gradient(sae.pre_activations(params, xs_BxD, compute_dtype))
  b, n = pre_BxN.shape
  if activation == "batchtopk":
    cand_BxC, idx_BxC = topk.candidates(pre_BxN, k)
    sel = topk.threshold_from_candidates(cand_BxC, pre_BxN, k, axes)
    spill_rows = jnp.sum(sel.spill_B, dtype=jnp.int32)
  else:  # per-token top-k: k slots, the row's k-th value as its threshold; nothing spills
    cand_BxC, idx_BxC = native.row_top_k(pre_BxN, min(k, n), sorted=False)
    if axes.latent:  # each device's top k of a row hold the row's top k over all devices
      thresh_Bx1 = topk.row_kth_largest(cand_BxC, k, axes.latent)[:, None]
    else:
      thresh_Bx1 = jnp.min(cand_BxC, axis=1, keepdims=True)
    r = topk.spill_buckets(b)[-1]
    sel = topk.Selection(thresh_Bx1, jnp.zeros((b,), bool),
                         jnp.arange(r, dtype=jnp.int32), jnp.zeros((r,), bool), jnp.zeros((), bool),
                         jnp.zeros((), jnp.int32))
    spill_rows = jnp.zeros((), jnp.int32)
  thresh = sel.thresh
  c = cand_BxC.shape[1]
  if c * SPARSE_MIN_RATIO > n:
    return _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype, axes), pre_BxN, _Events(
        spill_rows, jnp.zeros((), bool))
  on_BxC = (cand_BxC >= thresh) & (cand_BxC > 0) & ~sel.spill_B[:, None]
  dense_flag = sel.dense  # the same on every device: it comes from the pmax'd spill count

  def sparse_path():
    # The C slots per token, inactive ones zeroed (the kernels skip them): ~k of them per token.
    vals_BxC = jnp.where(on_BxC, sparse.slot_pre(cand_BxC, idx_BxC, xs_BxD, params["W_enc"], params["b_dec"],
                                                 params["b_enc"], compute_dtype), 0.0)
    recon = sparse.slot_decode(vals_BxC, idx_BxC, params["W_dec"], compute_dtype)
    active_N = jnp.zeros((n,), jnp.int32).at[idx_BxC].add(on_BxC.astype(jnp.int32))
    count = jnp.sum(on_BxC, dtype=jnp.int32)
    # Spilling rows (more selected entries than slots) are decoded densely, exactly, at the
    # smallest spill-bucket width that holds them (the same bucket the threshold used).
    def spill_rows_at(w):
      def run():
        idx_W, keep_W = sel.spill_idx_R[:w], sel.spill_mask_R[:w, None]
        vals_WxN = pre_BxN[idx_W]  # the encoder pass's values; column_pre adds their gradient
        pre_WxN = sparse.column_pre(vals_WxN, xs_BxD[idx_W], params["W_enc"], params["b_dec"], params["b_enc"],
                                    compute_dtype)
        pre_thresh = thresh if jnp.ndim(thresh) == 0 else thresh[idx_W]
        acts_WxN = jnp.where((vals_WxN >= pre_thresh) & (vals_WxN > 0) & keep_W, pre_WxN, 0.0)
        on_WxN = (acts_WxN > 0).astype(jnp.int32)
        return (recon.at[idx_W].add(sae.matmul(acts_WxN, params["W_dec"], compute_dtype)),
                active_N + jnp.sum(on_WxN, axis=0), count + jnp.sum(on_WxN))
      return run

    # (lax.switch calls a lone branch directly: no conditional when there is one bucket)
    out, active, l0 = jax.lax.switch(sel.bucket, [spill_rows_at(w) for w in topk.spill_buckets(b)])
    return dense.Recon(axes.psum_latent(out) + params["b_dec"], active, l0)

  return (jax.lax.cond(dense_flag, lambda: _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype, axes),
                       sparse_path),
          pre_BxN, _Events(spill_rows, dense_flag))


def _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype, axes: Axes) -> dense.Recon:
  """The reconstruction as dense matmuls; the encoder's values come from its gradient-free pass."""
  pre = sparse.column_pre(pre_BxN, xs_BxD, params["W_enc"], params["b_dec"], params["b_enc"], compute_dtype)
  on_BxN = (pre_BxN >= thresh) & (pre_BxN > 0)
  return dense.decode(params, pre, on_BxN, compute_dtype, axes)


def sae_loss(params: dict, x_BxD: jax.Array, since_fired_N: jax.Array, k: int, activation: str, aux_k: int,
             aux_coeff: float, *, dead_after_batches: int = 5, auxk_detach: bool = False,
             compute_dtype: str = "float32", axis_name=None, path: str = "slots") -> tuple[jax.Array, SAELoss]:
  """MSE on standardised inputs + aux_coeff * AuxK over the latents dead after this batch.

  `since_fired_N` counts batches since each latent last fired, before this one.
  As in the reference, this batch is counted first (a latent that fires now is
  not dead) and then latents at >= dead_after_batches feed AuxK; the updated
  counter comes back in the stats. `path` is the algorithm ("slots" or
  "dense"); the loss is the same. MSE and AuxK are this device's rows' means
  (the caller averages over the batch axes); statistics cover the global batch.
  """
  if path not in PATHS:
    raise ValueError(f"unknown path {path!r}; use one of {PATHS}")
  axes = Axes.of(axis_name)
  xs, mean, std = sae.standardize(x_BxD)
  if path == "dense":
    rec, pre_BxN = dense.reconstruct(params, xs, k, activation, axes, compute_dtype)
    events = _Events(jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  else:
    rec, pre_BxN, events = reconstruct(params, xs, k, activation, axes, compute_dtype)
  since_N = update_since_fired(since_fired_N, axes.psum_batch(rec.active_N) > 0)
  dead_N = since_N >= dead_after_batches
  mse = jnp.mean((rec.recon_std_BxD - xs) ** 2)
  residual = xs - rec.recon_std_BxD

  def aux_fn():
    if path == "dense":
      return dense.auxk(params, pre_BxN, dead_N, residual, aux_k, auxk_detach, compute_dtype, axes)
    return sae_auxk(params, xs, pre_BxN, dead_N, residual, aux_k, auxk_detach, compute_dtype, axes)

  # The predicate is the same on every device (dead latents live on all latent shards' counts), so
  # every device takes the branch and its collectives together.
  any_dead = axes.psum_latent(jnp.sum(dead_N, dtype=jnp.int32)) > 0
  # zeros_like, not zeros: under shard_map both branches must vary over the axes alike.
  aux = jax.lax.cond(any_dead, aux_fn, lambda: jnp.zeros_like(mse))
  x = jax.lax.stop_gradient(x_BxD)
  recon = sae.unstandardize(jax.lax.stop_gradient(rec.recon_std_BxD), mean, std)
  # FVU over the (global) batch, in the input's own space.
  count = x.shape[0] * axes.batch_shards()
  mean_D = axes.psum_batch(jnp.sum(x, axis=0)) / count
  err = axes.psum_batch(jnp.sum((x - recon) ** 2))
  var = axes.psum_batch(jnp.sum((x - mean_D) ** 2))
  l0 = axes.psum_all(rec.l0_sum.astype(jnp.float32)) / count
  stats = SAELoss(mse=mse, aux=aux, fvu=err / var, l0=l0, since_fired_N=since_N,
                  spill_rows=axes.psum_all(events.spill_rows).astype(jnp.float32),
                  dense_fallback=events.dense.astype(jnp.float32))
  return mse + aux_coeff * aux, stats


def update_since_fired(since_fired_N: jax.Array, fired_N: jax.Array) -> jax.Array:
  """Counts batches since each latent last fired (reset to 0 when it fires)."""
  return jnp.where(fired_N, 0, since_fired_N + 1)
