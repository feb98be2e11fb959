"""BatchTopK (fast path vs flattened reference), per-token TopK, AuxK on dead latents only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.core import losses, sae, topk


def _pre(seed, b, n):
  return jax.nn.relu(jax.random.normal(jax.random.PRNGKey(seed), (b, n)))


@pytest.mark.parametrize("b,n,k", [(64, 128, 4), (32, 40, 8), (16, 512, 1)])
def test_batchtopk_keeps_exactly_k_times_b_and_matches_reference(b, n, k):
  pre = _pre(b + n + k, b, n)
  acts = topk.batchtopk(pre, k)
  assert int(jnp.sum(acts > 0)) == k * b
  np.testing.assert_array_equal(acts, topk.batchtopk_reference(pre, k))
  # Brute force: the k*B largest of the flattened matrix.
  flat = np.asarray(pre).ravel()
  keep = np.zeros_like(flat)
  order = np.argsort(-flat)[:k * b]
  keep[order] = flat[order]
  np.testing.assert_array_equal(np.asarray(acts).ravel(), keep)


def test_batchtopk_row_overflow_falls_back_to_exact():
  pre = np.asarray(_pre(0, 32, 256)).copy()
  pre[3] = 100.0 + np.random.default_rng(0).uniform(size=256)  # row 3 holds far more than its candidates' share of the batch's top k*B
  acts = topk.batchtopk(jnp.asarray(pre), 4)
  assert int(jnp.sum(acts[3] > 0)) > topk.num_candidates(256, 4)
  np.testing.assert_array_equal(acts, topk.batchtopk_reference(jnp.asarray(pre), 4))


def test_topk_per_token_keeps_k_per_row():
  pre = _pre(1, 16, 64)
  acts = topk.topk_per_token(pre, 5)
  np.testing.assert_array_equal(np.sum(np.asarray(acts) > 0, axis=1), 5)
  np.testing.assert_allclose(np.sort(np.asarray(acts), axis=1)[:, -5:], np.sort(np.asarray(pre), axis=1)[:, -5:])


def test_auxk_only_touches_dead_latents():
  rng = jax.random.PRNGKey(0)
  params = sae.init_params(rng, 16, 64)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
  dead = jnp.zeros((64,), bool).at[jnp.arange(0, 64, 3)].set(True)
  out = sae.forward(params, x, 4)
  residual = out.xs_BxD - out.recon_std_BxD

  def aux(w_dec, pre, res, detach):
    return losses.auxk_loss(pre, dead, w_dec, res, aux_k=8, detach=detach)

  # Numpy reference of the AuxK value and of its gradient w.r.t. the residual target.
  pre_np = np.where(np.asarray(dead), np.asarray(out.pre_BxN), 0.0)
  top = np.argsort(-pre_np, axis=1)[:, :8]
  a = np.zeros_like(pre_np)
  np.put_along_axis(a, top, np.take_along_axis(pre_np, top, 1), 1)
  diff = a @ np.asarray(params["W_dec"]) - np.asarray(residual)
  for detach in (False, True):
    g_w, g_pre, g_res = jax.grad(aux, argnums=(0, 1, 2))(params["W_dec"], out.pre_BxN, residual, detach)
    live = ~np.asarray(dead)
    assert np.abs(np.asarray(g_w)[live]).max() == 0.0
    assert np.abs(np.asarray(g_pre)[:, live]).max() == 0.0
    assert np.abs(np.asarray(g_w)[~live]).max() > 0.0
    # The reference's target keeps its gradient, d/d(res) mean((a W - res)^2); OpenAI's recipe detaches it.
    np.testing.assert_allclose(g_res, 0.0 if detach else -2 * diff / diff.size, atol=1e-7)
    np.testing.assert_allclose(aux(params["W_dec"], out.pre_BxN, residual, detach), np.mean(diff ** 2), rtol=1e-5)


def test_no_aux_loss_without_dead_latents():
  params = sae.init_params(jax.random.PRNGKey(0), 8, 32)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
  loss, stats = losses.sae_loss(params, x, jnp.zeros((32,), jnp.int32), 2, "batchtopk", 512, 1 / 32)
  assert float(stats.aux) == 0.0
  np.testing.assert_allclose(loss, stats.mse)


@pytest.mark.parametrize("n_dead", [5, 300, 1200, 1500, 1800])
def test_auxk_over_slots_equals_full_width(n_dead):
  """Fewer dead latents than aux_k (5, 300: the rest of the slots hold zeros) and more (1200-1800)."""
  n = 2048
  rng = jax.random.split(jax.random.PRNGKey(n_dead), 4)
  pre = jax.nn.relu(jax.random.normal(rng[0], (16, n)))
  w = jax.random.normal(rng[1], (n, 8))
  res = jax.random.normal(rng[2], (16, 8))
  dead = jnp.zeros((n,), bool).at[jax.random.permutation(rng[3], n)[:n_dead]].set(True)

  def reference(pre, w):
    masked = np.where(np.asarray(dead), pre, 0.0)
    top = np.argsort(-masked, axis=1)[:, :512]
    a = np.zeros_like(masked)
    np.put_along_axis(a, top, np.take_along_axis(masked, top, 1), 1)
    return np.mean((a @ w - np.asarray(res)) ** 2)

  f = lambda pre, w: losses.auxk_loss(pre, dead, w, res, 512, detach=True)
  np.testing.assert_allclose(f(pre, w), reference(np.asarray(pre), np.asarray(w)), rtol=1e-5)
  # Gradients agree with the plain full-width formula.
  def plain(pre, w):
    masked = jnp.where(dead, pre, 0.0)
    return jnp.mean((topk.topk_per_token(masked, 512) @ w - res) ** 2)
  # Float32 sums in another order (the kernels' SIMD width depends on the CPU): tolerance relative to
  # the gradient's scale (entries near zero come out of cancelling sums).
  for a, b in zip(jax.grad(f, argnums=(0, 1))(pre, w), jax.grad(plain, argnums=(0, 1))(pre, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
