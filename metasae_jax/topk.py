"""Sparse activation rules: BatchTopK (global threshold over the batch) and per-token TopK.

Legend: B = tokens in the (local) batch, N = latents, C = candidates kept per row.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# Per-row candidates kept before the global threshold, as a multiple of k. A row
# needs more than this many of the batch's top k*B entries to overflow; then the
# exact (full) selection runs instead, so the result never depends on it.
CANDIDATE_FACTOR = 2


def _kth_largest(values: jax.Array, kth: int) -> jax.Array:
  """The kth largest entry of a 1-D array (kth >= 1)."""
  return jax.lax.top_k(values, kth)[0][kth - 1]


def batchtopk_threshold(pre_BxN: jax.Array, k: int, axis_name: Optional[str] = None) -> jax.Array:
  """Value of the (k*B_global)-th largest pre-activation over the whole (global) batch.

  Avoids sorting B*N values: each row contributes its top C candidates, the
  threshold is taken over the B*C candidates, and if any row had all C of its
  candidates selected (so it might have had more) the exact full selection runs.
  Under `axis_name` the candidates of all devices are gathered first, so every
  device gets the threshold of the global batch.
  """
  pre_BxN = jax.lax.stop_gradient(pre_BxN)
  b, n = pre_BxN.shape
  b_global = b if axis_name is None else b * jax.lax.psum(1, axis_name)
  keep = k * b_global
  c = min(n, CANDIDATE_FACTOR * k)
  cand_BxC = jax.lax.top_k(pre_BxN, c)[0]
  if axis_name is not None:
    cand_BxC = jax.lax.all_gather(cand_BxC, axis_name, tiled=True)
  if c == n:  # candidates are the whole matrix: already exact
    return _kth_largest(cand_BxC.reshape(-1), keep)
  thresh = _kth_largest(cand_BxC.reshape(-1), keep)
  overflow = jnp.any(cand_BxC[:, c - 1] >= thresh)

  def exact(_):
    full = pre_BxN if axis_name is None else jax.lax.all_gather(pre_BxN, axis_name, tiled=True)
    return _kth_largest(full.reshape(-1), keep)

  return jax.lax.cond(overflow, exact, lambda _: thresh, None)


def batchtopk(pre_BxN: jax.Array, k: int, axis_name: Optional[str] = None) -> jax.Array:
  """Keeps the k*B largest entries of the (global) batch, zeros the rest."""
  thresh = batchtopk_threshold(pre_BxN, k, axis_name)
  return jnp.where((pre_BxN >= thresh) & (pre_BxN > 0), pre_BxN, 0.0)


def batchtopk_reference(pre_BxN: jax.Array, k: int) -> jax.Array:
  """Straightforward BatchTopK: flatten, exact top-(k*B), scatter back (slow; for tests)."""
  b, n = pre_BxN.shape
  vals, idx = jax.lax.top_k(pre_BxN.reshape(-1), k * b)
  out = jnp.zeros(b * n, pre_BxN.dtype).at[idx].set(vals)
  return out.reshape(b, n)


def topk_per_token(pre_BxN: jax.Array, k: int) -> jax.Array:
  """Keeps each row's k largest entries."""
  thresh_B = jax.lax.top_k(jax.lax.stop_gradient(pre_BxN), k)[0][:, -1:]
  return jnp.where((pre_BxN >= thresh_B) & (pre_BxN > 0), pre_BxN, 0.0)


def threshold_activation(pre_BxN: jax.Array, threshold_N: jax.Array) -> jax.Array:
  """JumpReLU-style firing with calibrated per-latent thresholds (batch-independent)."""
  return jnp.where((pre_BxN > threshold_N) & (pre_BxN > 0), pre_BxN, 0.0)


def activate(pre_BxN: jax.Array, activation: str, k: int, axis_name: Optional[str] = None) -> jax.Array:
  if activation == "batchtopk":
    return batchtopk(pre_BxN, k, axis_name)
  if activation == "topk":
    return topk_per_token(pre_BxN, k)
  raise ValueError(f"unknown activation {activation!r}; use 'batchtopk' or 'topk'")
