"""Sparse activation rules: BatchTopK (global threshold over the batch) and per-token TopK.

Legend: B = tokens in the (local) batch, N = latents, C = candidates kept per row.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax.core import native

# Per-row candidates kept before the global threshold, as a multiple of k. A row
# needs more than this many of the batch's top k*B entries to overflow; then the
# exact (full) selection runs instead, so the result never depends on it.
CANDIDATE_FACTOR = 2


def _count_at_least(bits, t, axis_name):
  count = jnp.sum(bits >= t, dtype=jnp.int32)
  return count if axis_name is None else jax.lax.psum(count, axis_name)


def kth_largest(values: jax.Array, kth: int, axis_name: Optional[str] = None) -> jax.Array:
  """The kth largest of non-negative values (over all devices of `axis_name`), exactly.

  Bisection on the float bit pattern, which orders non-negative floats like
  integers: 31 counting passes (63 for float64), no sort. XLA:CPU's sort and large-k top_k are
  far slower than counting here, and under an axis each pass needs only one
  scalar psum instead of gathering the values.
  """
  wide = values.dtype == jnp.float64  # float64 only under jax_enable_x64 (tests)
  float_t, int_t = (jnp.float64, jnp.int64) if wide else (jnp.float32, jnp.int32)
  bits = jax.lax.bitcast_convert_type(jnp.maximum(values, 0.0).astype(float_t), int_t)

  def body(_, lo_hi):
    lo, hi = lo_hi  # invariant: count(bits >= lo) >= kth > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    ok = _count_at_least(bits, mid, axis_name) >= kth
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  # The bounds derive from `bits` so that under shard_map they vary over devices exactly as it does.
  lo0 = jnp.min(bits) * 0
  above_inf = 0x7FF0000000000001 if wide else 0x7F800001
  lo, _ = jax.lax.fori_loop(0, 63 if wide else 31, body, (lo0, lo0 + above_inf))
  return jax.lax.bitcast_convert_type(lo, float_t)


def candidates(pre_BxN: jax.Array, k: int):
  """Each row's top C = num_candidates(N, k) pre-activations and their latent ids (no gradient)."""
  return native.row_top_k(pre_BxN, num_candidates(pre_BxN.shape[-1], k))


def num_candidates(n: int, k: int) -> int:
  """Slots per row: 2k, and at least k + 32 so small k (the meta SAE's 8) rarely overflows."""
  return min(n, max(CANDIDATE_FACTOR * k, k + 32))


# Rows per device whose selected entries may exceed their C slots ("spill rows")
# that are handled exactly on the side, at the smallest allowance; larger ones grow
# with the batch (see `spill_buckets`); past the largest, callers fall back to dense.
SPILL_ROWS = 16
# The largest spill allowance is this fraction of the (local) batch's rows.
MAX_SPILL_FRACTION = 8


def spill_buckets(b: int) -> tuple:
  """Static spill-row allowances for a (local) batch of b rows: SPILL_ROWS, then 4x it doubling up to b/8.

  Each is one compiled branch; a step uses the smallest that holds its spilling
  rows. On real activations the count grows with the width and the batch
  (141-377 of 4096 rows at N 18432-36864), far past a fixed 16, and the dense
  fallback then costs a B x N x D product per matmul; a bucket costs r/B of it.
  """
  r = min(b, SPILL_ROWS)
  out, w = [r], 4 * r
  while 0 < w <= b // MAX_SPILL_FRACTION:
    out.append(w)
    w *= 2
  return tuple(out)


class Selection(NamedTuple):
  """BatchTopK's global threshold and which rows spill past their C candidate slots."""
  thresh: jax.Array  # scalar
  spill_B: jax.Array  # bool: all C candidates of this row are selected, it may have more
  spill_idx_R: jax.Array  # int32: R = spill_buckets(B)[-1] rows, the spilling ones first (padded with others)
  spill_mask_R: jax.Array  # bool: which of spill_idx_R really spill
  dense: jax.Array  # bool scalar: more spilling rows than the largest bucket (on some device)
  bucket: jax.Array  # int32 scalar: the smallest of spill_buckets(B) holding every device's spilling rows


def threshold_from_candidates(cand_BxC: jax.Array, pre_BxN: jax.Array, k: int,
                              axis_name: Optional[str] = None) -> Selection:
  """BatchTopK's exact global threshold from the rows' candidates.

  The (k*B_global)-th largest over the B*C candidates is the batch's unless
  some row had all C of its candidates selected (it might have had more). Those
  few rows enter whole: the threshold is then taken over the other rows'
  candidates plus every entry of the spilling rows, which holds every entry that
  can reach it (gathered at the smallest `spill_buckets` width that holds them).
  Only past the largest bucket does the count run over the full matrix. Under
  `axis_name` every device gets the global threshold and takes the same branch.
  """
  pre_BxN = jax.lax.stop_gradient(pre_BxN)
  b, n = pre_BxN.shape
  keep = k * (b if axis_name is None else b * jax.lax.psum(1, axis_name))
  widths = spill_buckets(b)
  c, r = cand_BxC.shape[1], widths[-1]
  thresh = kth_largest(cand_BxC, keep, axis_name)
  if c == n:  # candidates are the whole matrix: exact, and no row can hold more
    none_B = jnp.zeros((b,), bool)
    return Selection(thresh, none_B, jnp.arange(r, dtype=jnp.int32), none_B[:r], jnp.zeros((), bool),
                     jnp.zeros((), jnp.int32))
  # The row's C-th candidate is its minimum; a reduction, because slicing a top_k
  # result ([:, -1]) makes XLA:CPU lower the top_k as a full sort (~8x slower).
  spill_B = jnp.min(cand_BxC, axis=1) >= thresh
  num_spill = jnp.sum(spill_B, dtype=jnp.int32)
  if axis_name is not None:
    num_spill = jax.lax.pmax(num_spill, axis_name)  # every device takes the branch the fullest one needs
  bucket = jnp.searchsorted(jnp.asarray(widths, jnp.int32), num_spill).astype(jnp.int32)  # len = too many
  many = bucket >= len(widths)
  bucket = jnp.minimum(bucket, len(widths) - 1)
  _, spill_idx_R = jax.lax.top_k(spill_B.astype(jnp.float32), r)
  spill_mask_R = spill_B[spill_idx_R]

  def with_spill_rows(w):
    def run():
      rows_WxN = jnp.where(spill_mask_R[:w, None], pre_BxN[spill_idx_R[:w]], 0.0)
      others = jnp.where(spill_B[:, None], 0.0, cand_BxC)
      return kth_largest(jnp.concatenate([others.reshape(-1), rows_WxN.reshape(-1)]), keep, axis_name)
    return run

  branch = jnp.where(many, len(widths) + 1, jnp.where(num_spill > 0, bucket + 1, 0))
  thresh = jax.lax.switch(branch, [lambda: thresh] + [with_spill_rows(w) for w in widths]
                          + [lambda: kth_largest(pre_BxN, keep, axis_name)])
  return Selection(thresh, spill_B, spill_idx_R.astype(jnp.int32), spill_mask_R, many, bucket)


def batchtopk_threshold(pre_BxN: jax.Array, k: int, axis_name: Optional[str] = None) -> jax.Array:
  """Value of the (k*B_global)-th largest pre-activation over the whole (global) batch, without a sort."""
  cand_BxC, _ = candidates(pre_BxN, k)
  return threshold_from_candidates(cand_BxC, pre_BxN, k, axis_name).thresh


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
  thresh_B = native.row_kth(pre_BxN, k)[:, None]
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
