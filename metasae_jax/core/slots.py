"""The CPU's algorithm for the BatchTopK/TopK reconstruction: each row's C candidate slots and native kernels.

Legend: B = rows on this device, D = input dim, N = latents (on this device), C = candidate slots per row.
The selection comes from each row's candidates (`topk.candidates`); the
decoder and its gradients run over the slots (`sparse.slot_decode`; native
kernels on CPU). Rows whose selected entries spill past their slots are decoded
densely on the side, and the whole batch falls back to dense when more rows
spill than the largest allowance. `dense.py` is the accelerators' form of the
same reconstruction.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metasae_jax.core import dense, native, sae, sparse, topk
from metasae_jax.core.axes import Axes


# The slot path pays off when slots per token are a small fraction of the latents.
# Measured on 2 CPU cores with the native slot kernels: the meta SAE (C 40 of N 830,
# 9216 rows) runs its 5-step phase in 1.05-1.2 s over slots vs 2.36 s dense; the
# primary (C 128 of N 9216) decoder + gradients 0.12 s vs ~1.5 s dense.
SPARSE_MIN_RATIO = 8


class Events(NamedTuple):
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
    return _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype, axes), pre_BxN, Events(
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
          pre_BxN, Events(spill_rows, dense_flag))


def _dense_recon(params, xs_BxD, pre_BxN, thresh, compute_dtype, axes: Axes) -> dense.Recon:
  """The reconstruction as dense matmuls; the encoder's values come from its gradient-free pass."""
  pre = sparse.column_pre(pre_BxN, xs_BxD, params["W_enc"], params["b_dec"], params["b_enc"], compute_dtype)
  on_BxN = (pre_BxN >= thresh) & (pre_BxN > 0)
  return dense.decode(params, pre, on_BxN, compute_dtype, axes)


