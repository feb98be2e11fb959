"""Sparse slot ops (custom VJPs) against dense autodiff; the overflow fallback to the dense path."""

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax import losses, sae, sparse, topk


def _setup(b=64, d=12, n=80, c=8, seed=0):
  r = jax.random.split(jax.random.PRNGKey(seed), 5)
  w_dec = jax.random.normal(r[0], (n, d))
  w_enc = jax.random.normal(r[1], (d, n))
  b_dec = jax.random.normal(r[2], (d,))
  xs = jax.random.normal(r[3], (b, d))
  pre = xs @ w_enc - b_dec @ w_enc
  vals, idx = jax.lax.top_k(pre, c)
  return w_dec, w_enc, b_dec, xs, vals, idx


def _dense(vals, idx, n):
  b = vals.shape[0]
  return jnp.zeros((b, n)).at[jnp.arange(b)[:, None], idx].set(vals)


def test_decode_value_and_grads_match_dense():
  w_dec, _, _, _, vals, idx = _setup()
  g = jax.random.normal(jax.random.PRNGKey(9), (64, 12))
  f_sparse = lambda v, w: jnp.sum(sparse.decode(v, idx, w) * g)
  f_dense = lambda v, w: jnp.sum((_dense(v, idx, 80) @ w) * g)
  np.testing.assert_allclose(sparse.decode(vals, idx, w_dec), _dense(vals, idx, 80) @ w_dec, atol=1e-4)
  for a, b in zip(jax.grad(f_sparse, (0, 1))(vals, w_dec), jax.grad(f_dense, (0, 1))(vals, w_dec)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_slot_pre_grads_match_dense_encoder():
  _, w_enc, b_dec, xs, vals, idx = _setup(seed=1)
  g = jax.random.normal(jax.random.PRNGKey(8), vals.shape)

  def f_sparse(w, b):
    return jnp.sum(sparse.slot_pre(vals, idx, xs, w, b) * g)

  def f_dense(w, b):
    return jnp.sum(jnp.take_along_axis(xs @ w - b @ w, idx, axis=1) * g)

  np.testing.assert_allclose(f_sparse(w_enc, b_dec), f_dense(w_enc, b_dec), rtol=1e-5)
  for a, b in zip(jax.grad(f_sparse, (0, 1))(w_enc, b_dec), jax.grad(f_dense, (0, 1))(w_enc, b_dec)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def _loss_grads(params, x, k):
  return jax.grad(lambda p: losses.sae_loss(p, x, jnp.zeros((params["W_enc"].shape[1],), bool), k,
                                            "batchtopk", 512, 1 / 32)[0])(params)


def test_sae_loss_gradient_equals_dense_formula_with_and_without_overflow():
  params = sae.init_params(jax.random.PRNGKey(0), 16, 128)
  batch = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
  flags = set()
  for k in (4, 8):  # at this random init k=4 overflows the 2k candidate slots of some row, k=8 does not
    xs, _, _ = sae.standardize(batch)
    pre = sae.pre_activations(params, xs)
    cand, _ = topk.candidates(pre, k)
    overflow = bool(topk.threshold_from_candidates(cand, pre, k)[1])
    flags.add(overflow)

    def dense_loss(p):
      xs_, _, _ = sae.standardize(batch)
      acts = topk.batchtopk_reference(sae.pre_activations(p, xs_), k)
      return jnp.mean((acts @ p["W_dec"] + p["b_dec"] - xs_) ** 2)

    want = jax.grad(dense_loss)(params)
    got = _loss_grads(params, batch, k)
    for name in ("W_enc", "W_dec", "b_dec"):
      np.testing.assert_allclose(got[name], want[name], atol=2e-6, err_msg=f"{name} overflow={overflow}")
  assert flags == {True, False}  # both the sparse path and the dense fallback were checked
