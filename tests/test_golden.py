"""One loss-and-gradient evaluation against numbers from the paper's own PyTorch code.

Two fixtures (tests/fixtures/README.md): `reference_step` with no dead latent,
`reference_step_auxk` with AuxK active, which pins the dead-counter order and
the undetached AuxK target. Both the fast loss and `core/naive.py` must match.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metasae_jax
from metasae_jax.core import losses, meta, naive, optimizer, sae
from metasae_jax.core.config import TrainConfig


def _params(ref, prefix):
  return {name: jnp.asarray(ref[f"{prefix}/{name}"]) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _config(ref, auxk_detach=False) -> TrainConfig:
  d, n, k, m, meta_k, b = (int(v) for v in ref["config"])
  return TrainConfig(d_model=d, width=n, k=k, meta_width=m, meta_k=meta_k, batch_size=b,
                     lambda2=float(ref["lambda2"]), sigma_sq=float(ref["sigma_sq"]), aux_k=512,
                     aux_coeff=1 / 32, dead_after_batches=5, auxk_detach=auxk_detach)


def _since(ref, key, width):
  if key not in ref:  # reference_step: nothing has been idle
    return jnp.zeros((width,), jnp.int32)
  return jnp.asarray(ref[key].astype(np.int32))


def _fast_loss(c: TrainConfig, meta_params):
  """Our training loss (the fast paths), returning (loss, (l2, aux, penalty, since_after, meta fired))."""
  def f(p, x, since_N):
    l2_aux, stats = losses.sae_loss(p, x, since_N, c.k, "batchtopk", c.aux_k, c.aux_coeff,
                                    dead_after_batches=c.dead_after_batches, auxk_detach=c.auxk_detach)
    pen, rec = meta.penalty(p["W_dec"], meta_params, c.meta_k, c.sigma_sq, "stop")
    return l2_aux + c.lambda2 * pen, (stats.mse, c.aux_coeff * stats.aux, pen, stats.since_fired_N, rec.fired_M)
  return f


def _naive_loss(c: TrainConfig, meta_params):
  """The straightforward implementation, with the same outputs (pieces recomputed from its definitions)."""
  def f(p, x, since_N):
    total, (since, fired_M) = naive.loss(p, x, since_N, c, meta_params, c.lambda2)
    pen, _ = meta.penalty(p["W_dec"], meta_params, c.meta_k, c.sigma_sq, "stop")
    xs, _, _, recon, _, _ = naive._forward(p, x, c.k)
    l2 = jnp.mean((recon - xs) ** 2)
    return total, (l2, total - l2 - c.lambda2 * pen, pen, since, fired_M)
  return f


IMPLS = {"fast": _fast_loss, "naive": _naive_loss}


def _check_primary(ref, impl, auxk_detach=False):
  """Loss pieces, gradients and the primary counter after, for one implementation; returns the gradients."""
  c = _config(ref, auxk_detach)
  primary, meta_params = _params(ref, "primary"), _params(ref, "meta")
  x = jnp.asarray(ref["x"])
  since = _since(ref, "since_fired_before/primary", c.width)
  (loss, (l2, aux, pen, since_after, fired_M)), grads = jax.value_and_grad(
      IMPLS[impl](c, meta_params), has_aux=True)(primary, x, since)
  np.testing.assert_allclose(l2, ref["l2_loss"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(aux, ref.get("aux_loss", 0.0), rtol=1e-5, atol=2e-7)
  np.testing.assert_allclose(pen, ref["decomp_penalty"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(loss, ref["loss"], rtol=1e-6, atol=2e-6)
  if "since_fired_after/primary" in ref:
    np.testing.assert_array_equal(since_after, ref["since_fired_after/primary"].astype(np.int32))
    meta_since = losses.update_since_fired(_since(ref, "since_fired_before/meta", c.meta_width), fired_M)
    np.testing.assert_array_equal(meta_since, ref["since_fired_before_meta_loss/meta"].astype(np.int32))
  return grads, primary


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("fixture", ["reference_step", "reference_step_auxk"])
def test_joint_primary_loss_grads_and_counters_match_reference(fixture, impl, request):
  ref = request.getfixturevalue(fixture)
  grads, primary = _check_primary(ref, impl)
  for name in ("W_enc", "W_dec", "b_dec"):
    np.testing.assert_allclose(grads[name], ref[f"grad_raw/{name}"], atol=1e-6, err_msg=name)
  np.testing.assert_allclose(optimizer.remove_radial(grads["W_dec"], primary["W_dec"]),
                             ref["grad_projected/W_dec"], atol=1e-6)


def test_activations_and_penalty_rows_match_reference(reference_step):
  ref = reference_step
  c = _config(ref)
  primary, meta_params = _params(ref, "primary"), _params(ref, "meta")
  out = sae.forward(primary, jnp.asarray(ref["x"]), c.k)
  np.testing.assert_allclose(out.acts_BxN, ref["feature_acts"], atol=1e-6)
  assert int(jnp.sum(out.acts_BxN > 0)) == c.k * c.batch_size
  rows = jnp.exp(-jnp.sum((primary["W_dec"] - meta.reconstruct(meta_params, primary["W_dec"], c.meta_k)
                           .recon_NxD) ** 2, -1) / c.sigma_sq)
  np.testing.assert_allclose(rows, ref["penalty_rows"], atol=1e-6)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_detached_auxk_target_is_seen_by_the_golden_comparison(reference_step_auxk, impl):
  """OpenAI's recipe (detached target) gives the same loss but other gradients: the test can tell them apart."""
  ref = reference_step_auxk
  grads, _ = _check_primary(ref, impl, auxk_detach=True)  # values (and counters) are unchanged by detaching
  worst = max(float(np.max(np.abs(np.asarray(grads[name]) - ref[f"grad_raw/{name}"])))
              for name in ("W_enc", "W_dec", "b_dec"))
  assert worst > 1e-4  # 100x the golden tolerance: the comparison above would fail
  with pytest.raises(AssertionError):
    for name in ("W_enc", "W_dec", "b_dec"):
      np.testing.assert_allclose(grads[name], ref[f"grad_raw/{name}"], atol=1e-6)


@pytest.mark.parametrize("fixture", ["reference_step", "reference_step_auxk"])
def test_meta_loss_grads_and_counters_match_reference(fixture, request):
  ref = request.getfixturevalue(fixture)
  c = _config(ref)
  meta_params = _params(ref, "meta")
  w = meta.meta_inputs(jnp.asarray(ref["primary/W_dec"]))
  since = _since(ref, "since_fired_before_meta_loss/meta", c.meta_width)
  (loss, stats), grads = jax.value_and_grad(meta.meta_loss, has_aux=True)(
      meta_params, w, since, c.meta_k, c.aux_k, c.aux_coeff, c.dead_after_batches)
  np.testing.assert_allclose(loss, ref["meta_loss"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(stats.mse, ref["meta_l2_loss"], rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(c.aux_coeff * stats.aux, ref.get("meta_aux_loss", 0.0), atol=1e-7)
  np.testing.assert_allclose(sae.forward(meta_params, w, c.meta_k).acts_BxN, ref["meta_feature_acts"], atol=1e-6)
  for name in ("W_enc", "W_dec", "b_dec"):
    np.testing.assert_allclose(grads[name], ref[f"meta_grad/{name}"], atol=1e-6)
  if "since_fired_after/meta" in ref:
    np.testing.assert_array_equal(stats.since_fired_N, ref["since_fired_after/meta"].astype(np.int32))


def test_train_step_counters_follow_the_reference(reference_step_auxk):
  """The jitted step counts this batch before testing dead, and the penalty's forward advances the meta counter."""
  ref = reference_step_auxk
  c = dataclasses.replace(_config(ref), n_primary_steps=1000, baseline=False)  # no meta phase in this step
  state = metasae_jax.init_train_state(c)
  state = state.replace(
      joint=state.joint.replace(params=_params(ref, "primary"),
                                since_fired=_since(ref, "since_fired_before/primary", c.width)),
      meta=state.meta.replace(params=_params(ref, "meta"),
                              since_fired=_since(ref, "since_fired_before/meta", c.meta_width)))
  new, metrics = jax.jit(metasae_jax.train_step)(state, jnp.asarray(ref["x"]))
  np.testing.assert_array_equal(new.joint.since_fired, ref["since_fired_after/primary"].astype(np.int32))
  np.testing.assert_array_equal(new.meta.since_fired, ref["since_fired_before_meta_loss/meta"].astype(np.int32))
  np.testing.assert_allclose(c.aux_coeff * metrics["joint/aux"], ref["aux_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-6)
