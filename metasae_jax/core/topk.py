"""Sparse activation rules: BatchTopK (global threshold over the batch) and per-token TopK.

Legend: B = tokens in the (local) batch, N = latents (on this device), C = candidates kept per row.
`axis_name` is anything `axes.Axes.of` takes: None (one device), the name of the
axis that splits the batch (as under pmap), or an `Axes` whose latent axis also
splits N; thresholds then come from counts summed over the devices.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax.core import native
from metasae_jax.core.axes import Axes

# Per-row candidates kept before the global threshold, as a multiple of k. A row
# needs more than this many of the batch's top k*B entries to overflow; then the
# exact (full) selection runs instead, so the result never depends on it.
CANDIDATE_FACTOR = 2


def _bisect_bits(values: jax.Array, kth: int, count, shape: tuple) -> jax.Array:
  """The largest t with count(bits >= t) >= kth, by bisection on the float bit pattern of values >= 0.

  Non-negative floats order like their bit patterns as integers: 31 counting
  passes (63 for float64), no sort. `count(bits, t)` counts entries >= t (t of
  `shape`, summed over devices as the caller needs).
  """
  wide = values.dtype == jnp.float64  # float64 only under jax_enable_x64 (tests)
  float_t, int_t = (jnp.float64, jnp.int64) if wide else (jnp.float32, jnp.int32)
  bits = jax.lax.bitcast_convert_type(jnp.maximum(values, 0.0).astype(float_t), int_t)

  def body(_, lo_hi):
    lo, hi = lo_hi  # invariant: count(bits >= lo) >= kth > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    ok = count(bits, mid) >= kth
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  # The bounds derive from `bits` so that under shard_map they vary over devices exactly as it does.
  lo0 = jnp.zeros(shape, int_t) + jnp.min(bits) * 0
  above_inf = 0x7FF0000000000001 if wide else 0x7F800001
  lo, _ = jax.lax.fori_loop(0, 63 if wide else 31, body, (lo0, lo0 + above_inf))
  return jax.lax.bitcast_convert_type(lo, float_t)


def kth_largest(values: jax.Array, kth: int, axis_name=None) -> jax.Array:
  """The kth largest of non-negative values (over every device of the axes), exactly.

  XLA's sort and large-k top_k are far slower than counting on CPU and
  memory-bound on GPU/TPU, and under axes each pass needs only one scalar psum
  instead of gathering the values.
  """
  axes = Axes.of(axis_name)
  return _bisect_bits(values, kth, lambda bits, t: axes.psum_all(jnp.sum(bits >= t, dtype=jnp.int32)), ())


def row_kth_largest(values_BxX: jax.Array, kth: int, latent_axis: Optional[str] = None) -> jax.Array:
  """Each row's kth largest non-negative value, [B], over the row's entries on every device of `latent_axis`.

  Per-row bisection: each pass sums B counts over the latent axis, never the values.
  """
  def count(bits, t_B):
    c = jnp.sum(bits >= t_B[:, None], axis=1, dtype=jnp.int32)
    return jax.lax.psum(c, latent_axis) if latent_axis else c

  return _bisect_bits(values_BxX, kth, count, values_BxX.shape[:1])


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


def threshold_from_candidates(cand_BxC: jax.Array, pre_BxN: jax.Array, k: int, axis_name=None) -> Selection:
  """BatchTopK's exact global threshold from the rows' candidates.

  The (k*B_global)-th largest over the B*C candidates is the batch's unless
  some row had all C of its candidates selected (it might have had more). Those
  few rows enter whole: the threshold is then taken over the other rows'
  candidates plus every entry of the spilling rows, which holds every entry that
  can reach it (gathered at the smallest `spill_buckets` width that holds them).
  Only past the largest bucket does the count run over the full matrix. Under
  axes every device gets the global threshold and takes the same branch; with
  a latent axis the candidates are each device's part of the row's, and a
  "row" that spills is a row's part on one device.
  """
  axes = Axes.of(axis_name)
  pre_BxN = jax.lax.stop_gradient(pre_BxN)
  b, n = pre_BxN.shape
  keep = k * b * axes.batch_shards()
  widths = spill_buckets(b)
  c, r = cand_BxC.shape[1], widths[-1]
  thresh = kth_largest(cand_BxC, keep, axes)
  if c == n:  # candidates are the whole matrix: exact, and no row can hold more
    none_B = jnp.zeros((b,), bool)
    return Selection(thresh, none_B, jnp.arange(r, dtype=jnp.int32), none_B[:r], jnp.zeros((), bool),
                     jnp.zeros((), jnp.int32))
  # The row's C-th candidate is its minimum; a reduction, because slicing a top_k
  # result ([:, -1]) makes XLA:CPU lower the top_k as a full sort (~8x slower).
  spill_B = jnp.min(cand_BxC, axis=1) >= thresh
  # Every device takes the branch the fullest one needs.
  num_spill = axes.pmax_all(jnp.sum(spill_B, dtype=jnp.int32))
  bucket = jnp.searchsorted(jnp.asarray(widths, jnp.int32), num_spill).astype(jnp.int32)  # len = too many
  many = bucket >= len(widths)
  bucket = jnp.minimum(bucket, len(widths) - 1)
  _, spill_idx_R = jax.lax.top_k(spill_B.astype(jnp.float32), r)
  spill_mask_R = spill_B[spill_idx_R]

  def with_spill_rows(w):
    def run():
      rows_WxN = jnp.where(spill_mask_R[:w, None], pre_BxN[spill_idx_R[:w]], 0.0)
      others = jnp.where(spill_B[:, None], 0.0, cand_BxC)
      return kth_largest(jnp.concatenate([others.reshape(-1), rows_WxN.reshape(-1)]), keep, axes)
    return run

  branch = jnp.where(many, len(widths) + 1, jnp.where(num_spill > 0, bucket + 1, 0))
  thresh = jax.lax.switch(branch, [lambda: thresh] + [with_spill_rows(w) for w in widths]
                          + [lambda: kth_largest(pre_BxN, keep, axes)])
  return Selection(thresh, spill_B, spill_idx_R.astype(jnp.int32), spill_mask_R, many, bucket)


def batchtopk_threshold(pre_BxN: jax.Array, k: int, axis_name=None) -> jax.Array:
  """Value of the (k*B_global)-th largest pre-activation over the whole (global) batch, without a sort."""
  cand_BxC, _ = candidates(pre_BxN, k)
  return threshold_from_candidates(cand_BxC, pre_BxN, k, axis_name).thresh


def batchtopk_threshold_dense(pre_BxN: jax.Array, k: int, axis_name=None) -> jax.Array:
  """The same threshold by bisection over all B x N values: no top_k (the GPU/TPU form)."""
  axes = Axes.of(axis_name)
  return kth_largest(jax.lax.stop_gradient(pre_BxN), k * pre_BxN.shape[0] * axes.batch_shards(), axes)


def row_threshold(pre_BxN: jax.Array, k: int, axis_name=None, dense: bool = False) -> jax.Array:
  """Per-token TopK's threshold, each row's kth largest over all its latents, [B, 1].

  `dense`: bisection over the row's values (no top_k, the GPU/TPU form); else
  the kernel's row selection, whose candidates enter the bisection when a
  latent axis splits the row.
  """
  axes = Axes.of(axis_name)
  pre_BxN = jax.lax.stop_gradient(pre_BxN)
  if dense:
    return row_kth_largest(pre_BxN, k, axes.latent)[:, None]
  if axes.latent is None:
    return native.row_kth(pre_BxN, k)[:, None]
  # Each device's top k of the row hold the row's top k over all devices.
  cand_BxK, _ = native.row_top_k(pre_BxN, min(k, pre_BxN.shape[1]), sorted=False)
  return row_kth_largest(cand_BxK, k, axes.latent)[:, None]


def batchtopk(pre_BxN: jax.Array, k: int, axis_name=None) -> jax.Array:
  """Keeps the k*B largest entries of the (global) batch, zeros the rest."""
  thresh = batchtopk_threshold(pre_BxN, k, axis_name)
  return jnp.where((pre_BxN >= thresh) & (pre_BxN > 0), pre_BxN, 0.0)


def batchtopk_reference(pre_BxN: jax.Array, k: int) -> jax.Array:
  """Straightforward BatchTopK: flatten, exact top-(k*B), scatter back (slow; for tests)."""
  b, n = pre_BxN.shape
  vals, idx = jax.lax.top_k(pre_BxN.reshape(-1), k * b)
  out = jnp.zeros(b * n, pre_BxN.dtype).at[idx].set(vals)
  return out.reshape(b, n)


def topk_per_token(pre_BxN: jax.Array, k: int, axis_name=None) -> jax.Array:
  """Keeps each row's k largest entries."""
  thresh_Bx1 = row_threshold(pre_BxN, k, axis_name)
  return jnp.where((pre_BxN >= thresh_Bx1) & (pre_BxN > 0), pre_BxN, 0.0)


def threshold_activation(pre_BxN: jax.Array, threshold_N: jax.Array) -> jax.Array:
  """JumpReLU-style firing with calibrated per-latent thresholds (batch-independent)."""
  return jnp.where((pre_BxN > threshold_N) & (pre_BxN > 0), pre_BxN, 0.0)


def activate(pre_BxN: jax.Array, activation: str, k: int, axis_name=None) -> jax.Array:
  if activation == "batchtopk":
    return batchtopk(pre_BxN, k, axis_name)
  if activation == "topk":
    return topk_per_token(pre_BxN, k, axis_name)
  raise ValueError(f"unknown activation {activation!r}; use 'batchtopk' or 'topk'")
