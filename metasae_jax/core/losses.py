"""SAE training losses: reconstruction MSE, AuxK over dead latents, batch metrics.

Legend: B = batch, D = input dim, N = latents.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax.core import native, sae, sparse, topk


class SAELoss(NamedTuple):
  """Loss pieces and batch statistics of one SAE forward (everything a scalar but since_fired_N)."""
  mse: jax.Array
  aux: jax.Array
  fvu: jax.Array
  l0: jax.Array
  since_fired_N: jax.Array  # int32: batches since each latent fired, this (global) batch included
  # Slow-path events of this step (scalars, float32 so they average like the rest): rows whose
  # selected entries spilled past their candidate slots, and whether the decoder fell back to dense
  # (more spilling rows than the largest allowance).
  spill_rows: jax.Array = 0.0
  dense_fallback: jax.Array = 0.0


def _pmean(x, axis_name):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def auxk_loss(pre_BxN: jax.Array, dead_N: jax.Array, w_dec_NxD: jax.Array, residual_BxD: jax.Array,
              aux_k: int, detach: bool = False) -> jax.Array:
  """MSE of reconstructing the residual from each token's top aux_k dead latents.

  `detach=False` is the paper's reference (the residual target keeps its
  gradient, so AuxK also trains the main reconstruction); True is OpenAI's TopK
  recipe (the target is a constant). Differentiable in all four arrays.
  """
  return _auxk(pre_BxN, lambda idx_BxK, _: jnp.take_along_axis(pre_BxN, idx_BxK, axis=1), dead_N, w_dec_NxD,
               residual_BxD, aux_k, detach)


def _auxk(pre_BxN, slot_values, dead_N, w_dec_NxD, residual_BxD, aux_k, detach, compute_dtype="float32"):
  """AuxK over each token's top aux_k dead latents as K = min(aux_k, N) slots per token.

  `pre_BxN` gives the values (the selection takes no gradient); `slot_values(idx_BxK,
  top_BxK)` gives the chosen slots' values (`top_BxK`, gradient-free) with their gradient. The decoder and
  all gradients run over the B*K slots (`sparse.slot_decode`; native kernels on
  CPU), not over B x N or B x (dead) matrices, so the cost does not grow with the
  dead count. Only positive dead entries are chosen; when a token has fewer than
  K, the extra slots hold zeros and contribute nothing: the reference's
  min(aux_k, #dead) (its extra picks are zeros too).
  """
  n = dead_N.shape[0]
  target_BxD = jax.lax.stop_gradient(residual_BxD) if detach else residual_BxD
  top_BxK, idx_BxK = native.row_top_k_masked(pre_BxN, dead_N, min(aux_k, n))
  vals_BxK = jnp.where(top_BxK > 0, slot_values(idx_BxK, top_BxK), 0.0)
  return jnp.mean((sparse.slot_decode(vals_BxK, idx_BxK, w_dec_NxD, compute_dtype) - target_BxD) ** 2)


def sae_auxk(params: dict, xs_BxD: jax.Array, pre_BxN: jax.Array, dead_N: jax.Array, residual_BxD: jax.Array,
             aux_k: int, detach: bool = False, compute_dtype: str = "float32") -> jax.Array:
  """AuxK of an SAE, differentiable in its params, reusing the encoder pass's values `pre_BxN`."""

  def slot_values(idx_BxK, top_BxK):  # the selected values again, with their (slot-sparse) gradient
    return sparse.slot_pre(top_BxK, idx_BxK, xs_BxD, params["W_enc"], params["b_dec"], params["b_enc"],
                           compute_dtype)

  return _auxk(pre_BxN, slot_values, dead_N, params["W_dec"], residual_BxD, aux_k, detach, compute_dtype)


# The slot path pays off when slots per token are a small fraction of the latents.
# Measured on 2 CPU cores with the native slot kernels: the meta SAE (C 40 of N 830,
# 9216 rows) runs its 5-step phase in 1.05-1.2 s over slots vs 2.36 s dense; the
# primary (C 128 of N 9216) decoder + gradients 0.12 s vs ~1.5 s dense.
SPARSE_MIN_RATIO = 8


class _Recon(NamedTuple):
  recon_std_BxD: jax.Array
  active_N: jax.Array  # int32: tokens in this (local) batch on which each latent fired
  l0_sum: jax.Array  # active entries in this (local) batch


class _Events(NamedTuple):
  spill_rows: jax.Array  # rows past their slots (this device)
  dense: jax.Array  # bool: the dense fallback ran


def reconstruct(params: dict, xs_BxD: jax.Array, k: int, activation: str, axis_name: Optional[str],
                 compute_dtype: str = "float32"):
  """The SAE's reconstruction with gradient: over the C candidate slots per token (`sparse.slot_decode`;
  spilling rows exactly on the side), dense when more rows spill than the largest allowance or the slots
  are not a small fraction of the width."""
  pre_BxN = jax.lax.stop_gradient(sae.pre_activations(params, xs_BxD, compute_dtype))
  b, n = pre_BxN.shape
  if activation == "batchtopk":
    cand_BxC, idx_BxC = topk.candidates(pre_BxN, k)
    sel = topk.threshold_from_candidates(cand_BxC, pre_BxN, k, axis_name)
    spill_rows = jnp.sum(sel.spill_B, dtype=jnp.int32)
  else:  # per-token top-k: k slots, the row's k-th value as its threshold; nothing spills
    cand_BxC, idx_BxC = native.row_top_k(pre_BxN, k, sorted=False)
    r = topk.spill_buckets(b)[-1]
    sel = topk.Selection(jnp.min(cand_BxC, axis=1, keepdims=True), jnp.zeros((b,), bool),
                         jnp.arange(r, dtype=jnp.int32), jnp.zeros((r,), bool), jnp.zeros((), bool),
                         jnp.zeros((), jnp.int32))
    spill_rows = jnp.zeros((), jnp.int32)
  thresh = sel.thresh
  c = cand_BxC.shape[1]
  if c * SPARSE_MIN_RATIO > n:
    return _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype), pre_BxN, _Events(
        spill_rows, jnp.zeros((), bool))
  on_BxC = (cand_BxC >= thresh) & (cand_BxC > 0) & ~sel.spill_B[:, None]
  dense = sel.dense  # the same on every device: it comes from the pmax'd spill count

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
    return _Recon(out + params["b_dec"], active, l0)

  return (jax.lax.cond(dense, lambda: _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype), sparse_path),
          pre_BxN, _Events(spill_rows, dense))


def _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype) -> _Recon:
  """The reconstruction as dense matmuls; the encoder's values come from its gradient-free pass."""
  pre = sparse.column_pre(pre_BxN, xs_BxD, params["W_enc"], params["b_dec"], params["b_enc"], compute_dtype)
  acts_BxN = jnp.where((pre_BxN >= thresh) & (pre_BxN > 0), pre, 0.0)
  on_BxN = (acts_BxN > 0).astype(jnp.int32)
  return _Recon(sae.decode_std(params, acts_BxN, compute_dtype), jnp.sum(on_BxN, axis=0), jnp.sum(on_BxN))


def sae_loss(params: dict, x_BxD: jax.Array, since_fired_N: jax.Array, k: int, activation: str, aux_k: int,
             aux_coeff: float, *, dead_after_batches: int = 5, auxk_detach: bool = False,
             compute_dtype: str = "float32", axis_name: Optional[str] = None) -> tuple[jax.Array, SAELoss]:
  """MSE on standardised inputs + aux_coeff * AuxK over the latents dead after this batch.

  `since_fired_N` counts batches since each latent last fired, before this one.
  As in the reference, this batch is counted first (a latent that fires now is
  not dead) and then latents at >= dead_after_batches feed AuxK; the updated
  counter comes back in the stats.
  """
  xs, mean, std = sae.standardize(x_BxD)
  rec, pre_BxN, events = reconstruct(params, xs, k, activation, axis_name, compute_dtype)
  since_N = update_since_fired(since_fired_N, _psum(rec.active_N, axis_name) > 0)
  dead_N = since_N >= dead_after_batches
  mse = jnp.mean((rec.recon_std_BxD - xs) ** 2)
  residual = xs - rec.recon_std_BxD

  aux = jax.lax.cond(jnp.any(dead_N),
                     lambda: sae_auxk(params, xs, pre_BxN, dead_N, residual, aux_k, auxk_detach, compute_dtype),
                     # zeros_like, not zeros: under shard_map both branches must vary over the axis alike.
                     lambda: jnp.zeros_like(mse))
  x = jax.lax.stop_gradient(x_BxD)
  recon = sae.unstandardize(jax.lax.stop_gradient(rec.recon_std_BxD), mean, std)
  # FVU over the (global) batch, in the input's own space.
  count = _psum(x.shape[0], axis_name)
  mean_D = _psum(jnp.sum(x, axis=0), axis_name) / count
  err = _psum(jnp.sum((x - recon) ** 2), axis_name)
  var = _psum(jnp.sum((x - mean_D) ** 2), axis_name)
  l0 = _pmean(rec.l0_sum.astype(jnp.float32) / x.shape[0], axis_name)
  stats = SAELoss(mse=mse, aux=aux, fvu=err / var, l0=l0, since_fired_N=since_N,
                  spill_rows=_psum(events.spill_rows, axis_name).astype(jnp.float32),
                  dense_fallback=events.dense.astype(jnp.float32))
  return mse + aux_coeff * aux, stats


def update_since_fired(since_fired_N: jax.Array, fired_N: jax.Array) -> jax.Array:
  """Counts batches since each latent last fired (reset to 0 when it fires)."""
  return jnp.where(fired_N, 0, since_fired_N + 1)
