"""Sparse pair ops (custom VJPs) against dense autodiff; the overflow fallback to the dense path."""

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import losses, sae, sparse, topk


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


def _on(vals):
  """About half the slots, like BatchTopK's active slots among C = 2k candidates."""
  return vals > jnp.median(vals)


def _pairs(vals, idx, p):
  """Pairs of the `_on` slots, with a buffer of p."""
  pairs = sparse.compact(_on(vals), idx, p)
  return pairs, jnp.where(pairs.valid_P, vals.reshape(-1)[pairs.src_P], 0.0)


def test_compact_lists_the_active_slots_token_major():
  _, _, _, _, vals, idx = _setup(seed=2)
  on = np.asarray(_on(vals))
  pairs, _ = _pairs(vals, idx, 512)
  want = np.flatnonzero(on.reshape(-1))  # row-major = token-major
  count = int(pairs.count)
  assert count == len(want) and 0 < count < 512
  np.testing.assert_array_equal(np.asarray(pairs.src_P)[:count], want)
  np.testing.assert_array_equal(np.asarray(pairs.tok_P)[:count], want // idx.shape[1])
  np.testing.assert_array_equal(np.asarray(pairs.lat_P)[:count], np.asarray(idx).reshape(-1)[want])
  assert np.asarray(pairs.valid_P).sum() == count
  # Too small a buffer says so (the caller then takes the dense path).
  assert int(sparse.compact(_on(vals), idx, 64).count) > 64


def test_decode_value_and_grads_match_dense():
  w_dec, _, _, _, vals, idx = _setup()
  vals = jnp.where(_on(vals), vals, 0.0)
  pairs, _ = _pairs(vals, idx, 512)
  g = jax.random.normal(jax.random.PRNGKey(9), (64, 12))

  def f_sparse(v, w):
    v_P = jnp.where(pairs.valid_P, v.reshape(-1)[pairs.src_P], 0.0)
    return jnp.sum(sparse.decode(v_P, pairs.tok_P, pairs.lat_P, w, 64) * g)

  f_dense = lambda v, w: jnp.sum((_dense(v, idx, 80) @ w) * g)
  np.testing.assert_allclose(f_sparse(vals, w_dec), f_dense(vals, w_dec), rtol=1e-5)
  for a, b in zip(jax.grad(f_sparse, (0, 1))(vals, w_dec), jax.grad(f_dense, (0, 1))(vals, w_dec)):
    on = _on(vals).astype(jnp.float32)  # the listed slots; the dense version also differentiates the zeros
    np.testing.assert_allclose(a * on if a.shape == vals.shape else a, b * on if b.shape == vals.shape else b,
                               atol=1e-4)


def test_pair_pre_grads_match_dense_encoder():
  _, w_enc, b_dec, xs, vals, idx = _setup(seed=1)
  pairs, pre_P = _pairs(vals, idx, 512)
  g = jnp.where(pairs.valid_P, jax.random.normal(jax.random.PRNGKey(8), pre_P.shape), 0.0)

  def f_sparse(w, b):
    return jnp.sum(sparse.pair_pre(pre_P, pairs.tok_P, pairs.lat_P, xs, w, b) * g)

  def f_dense(w, b):
    pre = (xs @ w - b @ w)[pairs.tok_P, pairs.lat_P]
    return jnp.sum(jnp.where(pairs.valid_P, pre, 0.0) * g)

  np.testing.assert_allclose(f_sparse(w_enc, b_dec), f_dense(w_enc, b_dec), rtol=1e-5)
  for a, b in zip(jax.grad(f_sparse, (0, 1))(w_enc, b_dec), jax.grad(f_dense, (0, 1))(w_enc, b_dec)):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, atol=1e-4)


def _loss_grads(params, x, k):
  return jax.grad(lambda p: losses.sae_loss(p, x, jnp.zeros((params["W_enc"].shape[1],), jnp.int32), k,
                                            "batchtopk", 512, 1 / 32)[0])(params)


def test_sae_loss_gradient_equals_dense_formula_for_slots_spills_and_fallback(monkeypatch):
  n = 2048  # wide enough that the slot path is used (slots * SPARSE_MIN_RATIO <= n)
  params = sae.init_params(jax.random.PRNGKey(0), 16, n)
  batch = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
  # 100 encoder columns point along token 0, so its row holds more selected
  # entries than it has candidate slots: it spills.
  u = sae.standardize(batch[:1])[0][0]
  crowded = dict(params, W_enc=params["W_enc"].at[:, :100].set(
      u[:, None] * jnp.linspace(1.0, 1.5, 100)[None, :]))
  seen = []
  for p, spill_rows in ((params, 16), (crowded, 16), (crowded, 0)):
    monkeypatch.setattr(topk, "SPILL_ROWS", spill_rows)  # 0: any spill takes the dense fallback
    xs, _, _ = sae.standardize(batch)
    pre = sae.pre_activations(p, xs)
    cand, _ = topk.candidates(pre, 4)
    sel = topk.threshold_from_candidates(cand, pre, 4)
    seen.append((int(jnp.sum(sel.spill_B)), bool(sel.dense)))
    np.testing.assert_allclose(sel.thresh, np.sort(np.asarray(pre).ravel())[-4 * 64], rtol=1e-6)

    def dense_loss(q):
      xs_, _, _ = sae.standardize(batch)
      acts = topk.batchtopk_reference(sae.pre_activations(q, xs_), 4)
      return jnp.mean((acts @ q["W_dec"] + q["b_dec"] - xs_) ** 2)

    want = jax.grad(dense_loss)(p)
    got = _loss_grads(p, batch, 4)
    for name in ("W_enc", "W_dec", "b_dec"):
      np.testing.assert_allclose(got[name], want[name], atol=2e-6, err_msg=f"{name} {seen[-1]}")
  # Slots only; slots plus an exactly handled spilling row; the dense fallback.
  assert seen[0] == (0, False) and seen[1][0] >= 1 and not seen[1][1] and seen[2][1]


def test_column_pre_gradient_equals_autodiff_of_the_encoder_formula():
  """column_pre takes its values from the gradient-free pass; its gradient must be that of the formula."""
  rng = jax.random.split(jax.random.PRNGKey(3), 5)
  xs = jax.random.normal(rng[0], (12, 6))
  w = jax.random.normal(rng[1], (6, 10))
  b_dec = jax.random.normal(rng[2], (6,))  # nonzero: its term in dW_enc is what a naive version forgets
  b_enc = jax.random.normal(rng[3], (10,)) * 0.1
  g = jax.random.normal(rng[4], (12, 10))

  def formula(w, b_dec, b_enc):
    return jnp.sum(jax.nn.relu(xs @ w - b_dec @ w + b_enc) * g)

  def ours(w, b_dec, b_enc):
    pre = jax.lax.stop_gradient(jax.nn.relu(xs @ w - b_dec @ w + b_enc))
    return jnp.sum(sparse.column_pre(pre, xs, w, b_dec, b_enc) * g)

  np.testing.assert_allclose(ours(w, b_dec, b_enc), formula(w, b_dec, b_enc), rtol=1e-6)
  for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(w, b_dec, b_enc),
                  jax.grad(formula, argnums=(0, 1, 2))(w, b_dec, b_enc)):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
