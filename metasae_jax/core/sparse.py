"""Sparse forward/backward of the primary SAE: only the C candidate slots per token touch W.

Legend: B = batch, D = d_model, N = latents, C = candidate slots per token (>= its active latents).
BatchTopK leaves ~k of N latents active per token, yet a dense decoder and its
backward cost three B x N x D matmuls. Here the selection is made once from the
(gradient-free) dense pre-activations, each token keeps its top C (value, index)
slots, and the decoder, its input gradient and both weight gradients loop over
the C slots: a gather (or scatter-add) of B rows per slot. Measured on the
2-core CPU at d 576, n 9216, B 4096, C 128: decode 36 ms vs 275 ms dense, weight
gradients ~175 ms vs ~260 ms. Exact: every selected entry is in a slot, or the
caller falls back to the dense path.
"""

import functools

import jax
import jax.numpy as jnp

from metasae_jax.core import sae

# Rows per chunk when gathering decoder rows for the slot-value gradient.
_CHUNK = 64


def _scatter_rows(vals_BxC, idx_BxC, rows_BxD, n):
  """Σ_b,c vals[b, c] · rows[b] added into row idx[b, c] of an [N, D] matrix."""

  def body(c, acc_NxD):
    return acc_NxD.at[idx_BxC[:, c]].add(vals_BxC[:, c, None] * rows_BxD)

  return jax.lax.fori_loop(0, vals_BxC.shape[1], body, jnp.zeros((n, rows_BxD.shape[1]), rows_BxD.dtype))


def _gather_dot(g_BxD, idx_BxC, w_NxD):
  """out[b, c] = g[b] · w[idx[b, c]], in row chunks so the gathered block stays in cache."""
  b, c = idx_BxC.shape
  chunk = _CHUNK if b % _CHUNK == 0 else b
  gg = g_BxD.reshape(b // chunk, chunk, -1)
  ii = idx_BxC.reshape(b // chunk, chunk, c)
  out = jax.lax.map(lambda a: jnp.einsum("bd,bcd->bc", a[0], w_NxD[a[1]]), (gg, ii))
  return out.reshape(b, c)


@jax.custom_vjp
def decode(vals_BxC: jax.Array, idx_BxC: jax.Array, w_NxD: jax.Array) -> jax.Array:
  """Σ_c vals[b, c] · w[idx[b, c]]: the decoder without b_dec."""

  def body(c, acc_BxD):
    return acc_BxD + vals_BxC[:, c, None] * w_NxD[idx_BxC[:, c]]

  return jax.lax.fori_loop(0, vals_BxC.shape[1], body,
                           jnp.zeros((vals_BxC.shape[0], w_NxD.shape[1]), w_NxD.dtype))


def _decode_fwd(vals, idx, w):
  return decode(vals, idx, w), (vals, idx, w)


def _decode_bwd(res, g_BxD):
  vals, idx, w = res
  return _gather_dot(g_BxD, idx, w), None, _scatter_rows(vals, idx, g_BxD, w.shape[0])


decode.defvjp(_decode_fwd, _decode_bwd)


@jax.custom_vjp
def slot_pre(pre_BxC: jax.Array, idx_BxC: jax.Array, xs_BxD: jax.Array, w_enc_DxN: jax.Array,
             b_dec_D: jax.Array) -> jax.Array:
  """The pre-activations (xs - b_dec) W_enc at the slots, given their values; differentiable in W_enc, b_dec.

  The values come from the dense, gradient-free encoder pass that chose the
  slots; this op only supplies the sparse gradient: dW_enc[:, i] gets
  (xs_b - b_dec) · g[b, c] for each slot holding i, and b_dec gets -W_enc Σ g.
  """
  del idx_BxC, xs_BxD, w_enc_DxN, b_dec_D
  return pre_BxC


def _slot_pre_fwd(pre, idx, xs, w_enc, b_dec):
  return pre, (idx, xs, w_enc, b_dec)


def _slot_pre_bwd(res, g_BxC):
  idx, xs, w_enc, b_dec = res
  n = w_enc.shape[1]
  d_w_enc = _scatter_rows(g_BxC, idx, xs - b_dec, n).T
  col_sum_N = jnp.zeros((n,), g_BxC.dtype).at[idx.reshape(-1)].add(g_BxC.reshape(-1))
  return None, None, None, d_w_enc, -(w_enc @ col_sum_N)


slot_pre.defvjp(_slot_pre_fwd, _slot_pre_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def column_pre(pre_BxM: jax.Array, xs_BxD: jax.Array, w_enc_DxM: jax.Array, b_dec_D: jax.Array,
               b_enc_M: jax.Array, compute_dtype: str = "float32") -> jax.Array:
  """ReLU((xs - b_dec) W_enc + b_enc) of some columns, given their values; differentiable in the weights.

  The values come from the dense, gradient-free encoder pass, so AuxK does not
  compute them a second time; this op only supplies their gradient: through the
  ReLU, dW_enc = (xs - b_dec)^T g, db_dec = -W_enc Σ_b g, db_enc = Σ_b g.
  """
  del xs_BxD, w_enc_DxM, b_dec_D, b_enc_M, compute_dtype
  return pre_BxM


def _column_pre_fwd(pre, xs, w_enc, b_dec, b_enc, compute_dtype):
  del b_enc
  return pre, (pre > 0, xs, w_enc, b_dec)


def _column_pre_bwd(compute_dtype, res, g_BxM):
  on, xs, w_enc, b_dec = res
  g = jnp.where(on, g_BxM, 0.0)
  col_sum_M = jnp.sum(g, axis=0)
  d_w = sae.matmul((xs - b_dec).T, g, compute_dtype)
  return None, None, d_w, -(w_enc @ col_sum_M), col_sum_M


column_pre.defvjp(_column_pre_fwd, _column_pre_bwd)
