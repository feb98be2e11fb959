"""The native row_kth kernel (XLA FFI, CPU) against lax.top_k, and that the loss really uses it.

Legend: B = rows, M = row length.
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


def test_wide_rows_take_the_sampled_path_exactly():
  """Rows of >= 2048 with k < cols/4 go through the sampled estimate; rows built so that the estimate
  keeps fewer than k entries (a few huge values in the sample's places) must still be exact."""
  rng = np.random.default_rng(5)
  x = np.maximum(rng.normal(size=(96, 4096)), 0).astype(np.float32)
  x[:32, ::4] = 100.0 + rng.random((32, 1024))  # every sampled place is huge: the estimate is too high
  x[32:64] = np.round(x[32:64] * 2) / 2  # heavy ties
  x = jnp.asarray(x)
  for k in (1, 64, 512, 1000):
    np.testing.assert_array_equal(jax.jit(lambda v, k=k: native.row_kth(v, k))(x), native.row_kth_reference(x, k))
    for got, want in zip(jax.jit(lambda v, k=k: native.row_top_k(v, k))(x), jax.lax.top_k(x, k)):
      np.testing.assert_array_equal(got, want)


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
  hlo = jax.jit(lambda *a: losses.auxk_loss(*a, aux_k=16)).lower(*args).as_text()
  assert "metasae_row_kth" in hlo
  assert "metasae_row_kth" not in jax.jit(lambda v: native.row_kth(v, 3, native=False)).lower(args[0]).as_text()
