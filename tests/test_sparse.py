"""Sparse slot ops (custom VJPs) against dense autodiff; spilling rows and the fallback to the dense path."""

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


def test_slot_decode_value_and_grads_match_dense():
  """Zeroed slots are absent: no part in the products, value gradient 0 (the callers' jnp.where drops it)."""
  w_dec, _, _, _, vals, idx = _setup()
  vals = jnp.where(_on(vals), vals, 0.0)
  g = jax.random.normal(jax.random.PRNGKey(9), (64, 12))
  for dtype in ("float32", "bfloat16"):  # bfloat16: the dense XLA forms with bf16 inputs
    f_slots = lambda v, w, dtype=dtype: jnp.sum(sparse.slot_decode(v, idx, w, dtype) * g)
    f_dense = lambda v, w: jnp.sum((_dense(v, idx, 80) @ w) * g)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(jax.jit(f_slots)(vals, w_dec), f_dense(vals, w_dec), rtol=tol)
    present = (vals != 0).astype(jnp.float32)
    for a, b in zip(jax.jit(jax.grad(f_slots, (0, 1)))(vals, w_dec), jax.grad(f_dense, (0, 1))(vals, w_dec)):
      assert float(jnp.max(jnp.abs(b))) > 0
      b = b * present if b.shape == vals.shape else b
      np.testing.assert_allclose(a, b, atol=tol * float(jnp.max(jnp.abs(b))), err_msg=dtype)


def test_slot_pre_grads_match_dense_encoder():
  """The slot values' gradient is the encoder formula's at those slots, through the ReLU (zero slots: none)."""
  _, w_enc, b_dec, xs, _, idx = _setup(seed=1)
  b_enc = jnp.zeros((80,))
  idx = (idx + 37) % 80  # other columns than the top ones: about half are negative before the ReLU
  pre = jnp.take_along_axis(jax.nn.relu(xs @ w_enc - b_dec @ w_enc), idx, axis=1)  # negative: no gradient
  g = jax.random.normal(jax.random.PRNGKey(8), pre.shape)

  def f_slots(w, b):
    return jnp.sum(sparse.slot_pre(pre, idx, xs, w, b, b_enc) * g)

  def f_dense(w, b):
    return jnp.sum(jnp.take_along_axis(jax.nn.relu(xs @ w - b @ w + b_enc), idx, axis=1) * g)

  assert float(jnp.mean(pre == 0)) > 0.1
  np.testing.assert_allclose(f_slots(w_enc, b_dec), f_dense(w_enc, b_dec), rtol=1e-5)
  for a, b in zip(jax.jit(jax.grad(f_slots, (0, 1)))(w_enc, b_dec), jax.grad(f_dense, (0, 1))(w_enc, b_dec)):
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
