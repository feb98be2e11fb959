"""The native kernels (XLA FFI, CPU) against lax.top_k, numpy and XLA's dense forms; the loss really uses them.

Legend: B = rows (tokens), M = row length, K = slots per token, N = latents, D = row width.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.core import losses, native


def _cases():
  rng = np.random.default_rng(0)
  relu = np.maximum(rng.normal(size=(257, 300)), 0).astype(np.float32)  # about half zeros
  masked = np.where(rng.random((130, 1000)) < 0.9, 0, relu.max() * rng.random((130, 1000))).astype(np.float32)
  signed = rng.normal(size=(65, 40)).astype(np.float32)  # negatives: rows with fewer than k positive entries
  ties = rng.integers(0, 3, size=(64, 50)).astype(np.float32)  # many equal values at the k-th place
  zeros = np.zeros((70, 20), np.float32)
  nan = signed.copy()
  nan[3, 7] = np.nan
  return {"relu": relu, "masked": masked, "signed": signed, "ties": ties, "zeros": zeros, "nan": nan}


@pytest.mark.parametrize("name", sorted(_cases()))
def test_row_kth_equals_top_k(name):
  assert native.available(), "the kernel did not build (make install builds it; is a C++ compiler there?)"
  x = jnp.asarray(_cases()[name])
  m = x.shape[1]
  for k in sorted({1, 2, 7, m // 2, m - 1, m}):
    got = jax.jit(lambda v, k=k: native.row_kth(v, k))(x)
    want = native.row_kth_reference(x, k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{name} k={k}")
    # and against numpy's sort (NaN rows: top_k counts NaN as the largest, so the k-th is NaN for k >= 1)
    srt = -np.sort(-np.asarray(x), axis=1)[:, k - 1]
    ok = ~np.isnan(np.asarray(x)).any(1)
    np.testing.assert_array_equal(np.asarray(got)[ok], srt[ok])
    assert np.isnan(np.asarray(got)[~ok]).all()


@pytest.mark.parametrize("name", sorted(_cases()))
def test_row_top_k_equals_lax_top_k(name):
  """Values and indices, order included (ties by ascending index), so candidate slots are unchanged."""
  x = jnp.asarray(_cases()[name])
  m = x.shape[1]
  for k in sorted({1, 2, 7, m // 2, m - 1, m}):
    vals, idx = jax.jit(lambda v, k=k: native.row_top_k(v, k))(x)
    want_v, want_i = jax.lax.top_k(x, k)
    ok = ~np.isnan(np.asarray(x)).any(1)  # NaN rows: NaN values (lax.top_k would also put the NaN first)
    np.testing.assert_array_equal(np.asarray(vals)[ok], np.asarray(want_v)[ok], err_msg=f"{name} k={k}")
    np.testing.assert_array_equal(np.asarray(idx)[ok], np.asarray(want_i)[ok], err_msg=f"{name} k={k}")
    assert np.isnan(np.asarray(vals)[~ok]).all()


def test_wide_rows_take_the_block_estimate_exactly():
  """Rows of >= 256 with k <= (their blocks of 8) / 4 go through the block-maxima estimate (a histogram of
  the maxima, nth_element on the entries of the blocks that reach it). Rows built against it: a short tail
  past the last 64-entry chunk, heavy ties, one huge outlier (every other maximum in the lowest bin), all
  entries equal, all negative, +-inf, a range overflowing to inf, a range of two ulps, and NaN inside a
  chunk and in the tail."""
  rng = np.random.default_rng(5)
  cols = 4096 + 37
  x = np.maximum(rng.normal(size=(192, cols)), 0).astype(np.float32)
  x[:32, ::4] = 100.0 + rng.random((32, (cols + 3) // 4))  # large values on a stride
  x[32:64] = np.round(x[32:64] * 2) / 2  # heavy ties
  x[64:72, 5] = 1e30  # one outlier per row
  x[72:80] = 0.25  # all equal: a degenerate range
  x[80:96] = -1.0 - rng.random((16, cols))  # all negative
  x[96:100, 7] = np.inf
  x[100:104, 70] = -np.inf
  x[104:108] = -np.inf
  x[104:108, 3000] = 1.0
  x[108, 1000] = np.nan  # inside a chunk
  x[109, cols - 3] = np.nan  # in the tail
  x[110:120, cols - 37:] = 50.0 + rng.random((10, 37))  # the largest entries all in the tail
  x[120:124, ::2] = -3e38  # max - min overflows to inf
  x[120:124, 1::2] = 3e38 * rng.random((4, cols // 2))
  x[124:128] = 1.0 + np.float32(2**-23) * rng.integers(0, 3, size=(4, cols))  # a range of two ulps
  x = jnp.asarray(x)
  ok = ~np.isnan(np.asarray(x)).any(1)
  for k in (1, 64, 130, 512, 1000):
    got = jax.jit(lambda v, k=k: native.row_kth(v, k))(x)
    np.testing.assert_array_equal(np.asarray(got)[ok], np.asarray(native.row_kth_reference(x, k))[ok])
    np.testing.assert_array_equal(np.asarray(got)[ok], -np.sort(-np.asarray(x)[ok], axis=1)[:, k - 1])
    assert np.isnan(np.asarray(got)[~ok]).all()
    for got, want in zip(jax.jit(lambda v, k=k: native.row_top_k(v, k))(x), jax.lax.top_k(x, k)):
      np.testing.assert_array_equal(np.asarray(got)[ok], np.asarray(want)[ok])


def test_row_kth_under_vmap_switch_and_grad():
  x = jnp.asarray(np.random.default_rng(1).random((4, 100, 64)), jnp.float32)
  got = jax.jit(jax.vmap(lambda v: native.row_kth(v, 10)))(x)
  np.testing.assert_array_equal(got, native.row_kth_reference(x, 10))
  pick = jax.jit(lambda i, v: jax.lax.switch(i, [lambda: native.row_kth(v, 3), lambda: native.row_kth(v, 30)]))
  np.testing.assert_array_equal(pick(1, x[0]), native.row_kth_reference(x[0], 30))
  # No gradient through the threshold; the masked sum's gradient is the mask.
  g = jax.grad(lambda v: jnp.sum(jnp.where(v >= native.row_kth(v, 5)[:, None], v, 0.0)))(x[0])
  np.testing.assert_array_equal(g, (x[0] >= native.row_kth_reference(x[0], 5)[:, None]).astype(jnp.float32))


def test_auxk_loss_lowers_to_the_kernel_on_cpu():
  n, d, b = 64, 8, 32
  rng = np.random.default_rng(2)
  args = (jnp.asarray(rng.random((b, n)), jnp.float32), jnp.asarray(rng.random(n) < 0.5),
          jnp.asarray(rng.normal(size=(n, d)), jnp.float32), jnp.asarray(rng.normal(size=(b, d)), jnp.float32))
  hlo = jax.jit(jax.value_and_grad(lambda *a: losses.auxk_loss(*a, aux_k=16), argnums=(0, 2))).lower(*args).as_text()
  for target in ("metasae_row_top_k_masked", "metasae_slot_gather_sum", "metasae_slot_gather_dot",
                 "metasae_slot_scatter_outer"):
    assert target in hlo, target
  assert "metasae_row_kth" not in jax.jit(lambda v: native.row_kth(v, 3, native=False)).lower(args[0]).as_text()


def test_unsorted_top_k_is_the_same_set_in_index_order():
  x = jnp.asarray(_cases()["ties"])  # ties: which of the equal values are taken must still match top_k
  for k in (1, 7, 25, 50):
    vals, idx = jax.jit(lambda v, k=k: native.row_top_k(v, k, sorted=False))(x)
    want_v, want_i = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(idx), np.sort(np.asarray(want_i), axis=1))
    np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(np.asarray(x), np.asarray(idx), 1))


def _slot_problem(b, k, n, d, seed=0, duplicates=False):
  rng = np.random.default_rng(seed)
  if duplicates:  # any indices, repeats within a row included (the kernels must add them up)
    idx = rng.integers(0, n, size=(b, k))
  else:
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(b)])
  vals = rng.normal(size=(b, k)).astype(np.float32)
  vals[rng.random((b, k)) < 0.3] = 0.0  # zero slots are skipped by the kernels
  w = rng.normal(size=(n, d)).astype(np.float32)
  g = rng.normal(size=(b, d)).astype(np.float32)
  return vals, idx.astype(np.int32), w, g


# d: a multiple of the 64-float block, a block plus a tail, and shorter than one block.
@pytest.mark.parametrize("b,k,n,d,dup", [(33, 7, 50, 128, False), (100, 16, 40, 200, True), (5, 3, 9, 5, True),
                                         (70, 64, 300, 576, False)])
def test_slot_products_match_numpy(b, k, n, d, dup):
  vals, idx, w, g = _slot_problem(b, k, n, d, duplicates=dup)
  dense = np.zeros((b, n), np.float64)
  np.add.at(dense, (np.arange(b)[:, None], idx), vals)
  args = [jnp.asarray(a) for a in (vals, idx, w, g)]
  got_sum = jax.jit(native.slot_gather_sum)(*args[:3])
  got_dot = jax.jit(native.slot_gather_dot)(args[3], args[1], args[2], args[0])
  got_out, got_sums = jax.jit(lambda v, i, r: native.slot_scatter_outer(v, i, r, n))(args[0], args[1], args[3])
  np.testing.assert_allclose(got_sum, dense @ w, rtol=1e-5, atol=1e-4)
  # Zero slots are absent: their dot is 0.
  np.testing.assert_allclose(got_dot, np.where(vals != 0, np.einsum("bd,bkd->bk", g, w[idx]), 0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_out, dense.T @ g, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_sums, dense.sum(0), rtol=1e-5, atol=1e-5)
  # The XLA fallbacks agree too (what GPU/TPU run).
  np.testing.assert_allclose(native.slot_gather_sum(*args[:3], native=False), dense @ w, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(native.slot_scatter_outer(args[0], args[1], args[3], n, native=False)[0], dense.T @ g,
                             rtol=1e-5, atol=1e-4)


def test_slot_index_out_of_range_is_an_error():
  vals, idx, w, _ = _slot_problem(8, 4, 10, 16)
  idx[3, 2] = 10
  with pytest.raises(Exception, match="slot index outside"):
    jax.block_until_ready(jax.jit(native.slot_gather_sum)(jnp.asarray(vals), jnp.asarray(idx), jnp.asarray(w)))


def test_slot_products_under_vmap_and_in_grad():
  """vmap (seeds stacked) runs the kernel per member; slot_decode's gradient equals the dense product's
  (at the present slots: a zero slot is absent and gets no value gradient)."""
  from metasae_jax.core import sparse  # pylint: disable=g-import-not-at-top
  probs = [_slot_problem(16, 5, 30, 70, seed=s) for s in range(3)]
  vals, idx, w, g = (jnp.asarray(np.stack(a)) for a in zip(*probs))
  got = jax.jit(jax.vmap(native.slot_gather_sum))(vals, idx, w)
  np.testing.assert_allclose(got, jax.vmap(lambda v, i, w: native.slot_gather_sum(v, i, w, native=False))(
      vals, idx, w), rtol=1e-5, atol=1e-5)

  def dense_loss(v, w, i):
    return jnp.sum(jnp.sin(native._slots_dense(v, i, w.shape[0]) @ w))  # pylint: disable=protected-access
  slot_loss = lambda v, w, i: jnp.sum(jnp.sin(sparse.slot_decode(v, i, w)))
  got_v, got_w = jax.jit(jax.grad(slot_loss, argnums=(0, 1)))(vals[0], w[0], idx[0])
  want_v, want_w = jax.grad(dense_loss, argnums=(0, 1))(vals[0], w[0], idx[0])
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_v, jnp.where(vals[0] != 0, want_v, 0.0), rtol=1e-5, atol=1e-5)
  assert float(jnp.sum(vals[0] == 0)) > 0 and float(jnp.max(jnp.abs(want_v))) > 0


@pytest.mark.parametrize("name", ["relu", "masked", "signed", "ties", "zeros", "nan"])
def test_masked_top_k_is_the_positive_top_k_of_the_masked_columns(name):
  """Against numpy: per row, the set of (index, value) of the largest positive masked entries (up to k;
  ties to the lower index); every other slot holds 0. Masks with few and with most columns set."""
  x = _cases()[name]
  rng = np.random.default_rng(3)
  m = x.shape[1]
  for frac in (0.05, 0.6, 1.0):
    mask = rng.random(m) < frac
    for k in sorted({1, 5, m // 2, m, m + 3}):
      vals, idx = jax.jit(lambda v, on, k=k: native.row_top_k_masked(v, on, k))(jnp.asarray(x), jnp.asarray(mask))
      vals, idx = np.asarray(vals), np.asarray(idx)
      assert vals.shape == idx.shape == (x.shape[0], k) and (0 <= idx).all() and (idx < m).all()
      for r in range(x.shape[0]):
        if np.isnan(x[r][mask]).any():
          assert np.isnan(vals[r]).all()
          continue
        cand = [c for c in np.flatnonzero(mask) if x[r, c] > 0]
        want = sorted(sorted(cand, key=lambda c: (-x[r, c], c))[:k])
        got = sorted(idx[r][vals[r] != 0])
        assert got == want, (name, frac, k, r)
        np.testing.assert_array_equal(np.sort(vals[r][vals[r] != 0]), np.sort(x[r, want]))
        assert (vals[r] >= 0).all()
      # The XLA fallback chooses the same positive entries.
      fv, fi = native.row_top_k_masked(jnp.asarray(x), jnp.asarray(mask), k, native=False)
      ok = ~np.isnan(np.where(mask, x, 0)).any(1)
      for r in np.flatnonzero(ok):
        assert sorted(np.asarray(fi)[r][np.asarray(fv)[r] > 0]) == sorted(idx[r][vals[r] > 0])


def test_masked_top_k_with_fewer_positives_than_masked_columns_in_a_wider_block_layout():
  """320 masked columns, 319 positive in every row, k 20: the selection runs on 319 entries, which form more
  blocks (4 chunks of 64 + 63 single entries) than 320 do; the scratch must be sized for that."""
  rng = np.random.default_rng(11)
  x = (0.5 + rng.random((96, 400))).astype(np.float32)
  mask = np.zeros(400, bool)
  mask[40:360] = True
  x[np.arange(96), 40 + rng.integers(0, 320, size=96)] = 0.0  # one masked entry per row is not positive
  for k in (20, 23):
    vals, idx = (np.asarray(a) for a in jax.jit(lambda v, on, k=k: native.row_top_k_masked(v, on, k))(
        jnp.asarray(x), jnp.asarray(mask)))
    for r in range(96):
      cand = [c for c in np.flatnonzero(mask) if x[r, c] > 0]
      assert len(cand) == 319
      assert sorted(idx[r]) == sorted(sorted(cand, key=lambda c: (-x[r, c], c))[:k]), (k, r)
      np.testing.assert_array_equal(np.sort(vals[r]), np.sort(x[r, idx[r]]))


def test_whole_loss_on_the_xla_fallbacks_equals_the_kernels(monkeypatch):
  """GPU/TPU (and CPUs without a compiler) run the XLA forms of every kernel: the primary's loss and
  gradients, slot decoder and AuxK with most latents dead included, must not change."""
  from metasae_jax.core import sae  # pylint: disable=g-import-not-at-top
  n, d, b = 2048, 16, 128
  params = sae.init_params(jax.random.PRNGKey(0), d, n)
  x = jax.random.normal(jax.random.PRNGKey(1), (b, d))
  since = jnp.where(jnp.arange(n) % 3 == 0, 0, 10).astype(jnp.int32)  # two thirds dead
  f = lambda p: losses.sae_loss(p, x, since, 4, "batchtopk", 64, 1 / 32)

  def run():
    jax.clear_caches()
    fn = jax.jit(jax.value_and_grad(f, has_aux=True))
    return fn(params), fn.lower(params).as_text()

  (want, g_want), hlo = run()
  assert "metasae_slot_gather_sum" in hlo and float(want[1].aux) > 0
  monkeypatch.setattr(native, "available", lambda: False)
  (got, g_got), hlo = run()
  jax.clear_caches()
  assert "metasae_" not in hlo
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1].aux, want[1].aux, rtol=1e-5)
  for name in ("W_enc", "W_dec", "b_dec"):
    scale = float(jnp.max(jnp.abs(g_want[name])))
    assert scale > 0
    np.testing.assert_allclose(g_got[name], g_want[name], atol=1e-5 * scale, err_msg=name)
