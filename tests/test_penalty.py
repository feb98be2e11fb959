"""The decomposability penalty: values vs numpy, gradients vs finite differences in both modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.core import meta, sae


def _setup(seed=0, n=24, d=8, m=6, meta_k=2):
  rngs = jax.random.split(jax.random.PRNGKey(seed), 3)
  w = sae.normalize_rows(jax.random.normal(rngs[0], (n, d)))
  mp = sae.init_params(rngs[1], d, m)
  mp["b_dec"] = 0.1 * jax.random.normal(rngs[2], (d,))
  return w, mp, meta_k


def _np_penalty(w, mp, meta_k, sigma_sq):
  w = np.asarray(w, np.float64)
  mu, sd = w.mean(1, keepdims=True), w.std(1, ddof=1, keepdims=True)
  xs = (w - mu) / (sd + 1e-5)
  pre = np.maximum((xs - np.asarray(mp["b_dec"])) @ np.asarray(mp["W_enc"]), 0)
  flat = pre.ravel()
  keep = np.argsort(-flat)[:meta_k * w.shape[0]]
  a = np.zeros_like(flat)
  a[keep] = flat[keep]
  rec = a.reshape(pre.shape) @ np.asarray(mp["W_dec"]) + np.asarray(mp["b_dec"])
  w_hat = rec * sd + mu
  return np.mean(np.exp(-np.sum((w - w_hat) ** 2, 1) / sigma_sq)), w_hat


@pytest.mark.parametrize("sigma_sq", [0.3, 1.0])
def test_penalty_value_matches_numpy(sigma_sq):
  w, mp, meta_k = _setup()
  got, _ = meta.penalty(w, mp, meta_k, sigma_sq, "stop")
  want, _ = _np_penalty(w, mp, meta_k, sigma_sq)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_stop_mode_on_the_slot_path_matches_numpy():
  """Meta width >= 8x its candidate slots: the stop-mode forward decodes over slots, not densely. Value,
  reconstruction, fired meta latents and meta MSE against numpy, and against the dense `reconstruct`."""
  w, mp, meta_k = _setup(seed=3, n=300, d=16, m=400, meta_k=4)
  got, rec = meta.penalty(w, mp, meta_k, 0.5, "stop")
  want, w_hat = _np_penalty(w, mp, meta_k, 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(rec.recon_NxD, w_hat, rtol=1e-4, atol=1e-5)
  dense = meta.reconstruct(mp, w, meta_k)
  np.testing.assert_array_equal(rec.fired_M, dense.fired_M)
  assert 0 < int(np.sum(rec.fired_M)) < 400
  np.testing.assert_allclose(rec.mse, dense.mse, rtol=1e-5)


def test_stop_mode_gradient_is_analytic_and_matches_finite_differences():
  w, mp, meta_k = _setup(1)
  sigma_sq = 0.7
  g = jax.grad(lambda w: meta.penalty(w, mp, meta_k, sigma_sq, "stop")[0])(w)
  _, w_hat = _np_penalty(w, mp, meta_k, sigma_sq)
  w64 = np.asarray(w, np.float64)
  p = np.exp(-np.sum((w64 - w_hat) ** 2, 1, keepdims=True) / sigma_sq)
  analytic = -2.0 / sigma_sq * p * (w64 - w_hat) / w.shape[0]
  np.testing.assert_allclose(g, analytic, atol=1e-6)
  # Finite differences with ŵ held fixed (the definition of "stop").
  eps = 1e-3
  rng = np.random.default_rng(0)
  for _ in range(5):
    i, j = rng.integers(w.shape[0]), rng.integers(w.shape[1])
    def f(delta):
      w2 = w64.copy()
      w2[i, j] += delta
      return np.mean(np.exp(-np.sum((w2 - w_hat) ** 2, 1) / sigma_sq))
    fd = (f(eps) - f(-eps)) / (2 * eps)
    np.testing.assert_allclose(g[i, j], fd, atol=1e-5)


def test_through_mode_gradient_matches_finite_differences():
  w, mp, meta_k = _setup(2)
  sigma_sq = 1.0
  with jax.enable_x64(True):
    w64 = jnp.asarray(np.asarray(w), jnp.float64)
    mp64 = {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in mp.items()}
    f = lambda w: meta.penalty(w, mp64, meta_k, sigma_sq, "through")[0]
    g = np.asarray(jax.grad(f)(w64))
    g_stop = np.asarray(jax.grad(lambda w: meta.penalty(w, mp64, meta_k, sigma_sq, "stop")[0])(w64))
    eps = 1e-6
    rng = np.random.default_rng(1)
    for _ in range(8):
      i, j = rng.integers(w.shape[0]), rng.integers(w.shape[1])
      e = jnp.zeros_like(w64).at[i, j].set(eps)
      fd = (float(f(w64 + e)) - float(f(w64 - e))) / (2 * eps)
      np.testing.assert_allclose(g[i, j], fd, rtol=1e-4, atol=1e-8)
  assert np.abs(g - g_stop).max() > 1e-6  # the meta path really contributes


def test_meta_params_get_no_gradient_from_penalty():
  w, mp, meta_k = _setup(3)
  for mode in ("stop", "through"):
    g = jax.grad(lambda mp: meta.penalty(w, mp, meta_k, 1.0, mode)[0])(mp)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in g.values())
