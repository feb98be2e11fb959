"""One loss-and-gradient evaluation against numbers from the paper's own PyTorch code."""

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import losses, meta, optimizer, sae


def _params(ref, prefix):
  return {name: jnp.asarray(ref[f"{prefix}/{name}"]) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def test_joint_primary_loss_and_grads_match_reference(reference_step):
  ref = reference_step
  d, n, k, m, meta_k, b = (int(v) for v in ref["config"])
  primary, meta_params = _params(ref, "primary"), _params(ref, "meta")
  x = jnp.asarray(ref["x"])
  lam, sig = float(ref["lambda2"]), float(ref["sigma_sq"])
  no_dead = jnp.zeros((n,), bool)

  def loss_fn(p):
    l2, stats = losses.sae_loss(p, x, no_dead, k, "batchtopk", 512, 1 / 32)
    pen, _ = meta.penalty(p["W_dec"], meta_params, meta_k, sig, "stop")
    return l2 + lam * pen, (l2, pen)

  (loss, (l2, pen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(primary)
  out = sae.forward(primary, x, k)
  np.testing.assert_allclose(out.acts_BxN, ref["feature_acts"], atol=1e-6)
  assert int(jnp.sum(out.acts_BxN > 0)) == k * b
  np.testing.assert_allclose(l2, ref["l2_loss"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(pen, ref["decomp_penalty"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(loss, ref["loss"], rtol=1e-6, atol=2e-6)
  rows = jnp.exp(-jnp.sum((primary["W_dec"] - meta.reconstruct(meta_params, primary["W_dec"], meta_k)
                           .recon_NxD) ** 2, -1) / sig)
  np.testing.assert_allclose(rows, ref["penalty_rows"], atol=1e-6)
  for name in ("W_enc", "W_dec", "b_dec"):
    np.testing.assert_allclose(grads[name], ref[f"grad_raw/{name}"], atol=1e-6)
  np.testing.assert_allclose(optimizer.remove_radial(grads["W_dec"], primary["W_dec"]),
                             ref["grad_projected/W_dec"], atol=1e-6)


def test_meta_loss_and_grads_match_reference(reference_step):
  ref = reference_step
  d, n, k, m, meta_k, b = (int(v) for v in ref["config"])
  meta_params = _params(ref, "meta")
  w = meta.meta_inputs(jnp.asarray(ref["primary/W_dec"]))
  (loss, stats), grads = jax.value_and_grad(meta.meta_loss, has_aux=True)(
      meta_params, w, jnp.zeros((m,), bool), meta_k, 512, 1 / 32)
  np.testing.assert_allclose(loss, ref["meta_loss"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(stats.mse, ref["meta_l2_loss"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(sae.forward(meta_params, w, meta_k).acts_BxN, ref["meta_feature_acts"], atol=1e-6)
  for name in ("W_enc", "W_dec", "b_dec"):
    np.testing.assert_allclose(grads[name], ref[f"meta_grad/{name}"], atol=1e-6)
