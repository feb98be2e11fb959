"""Fast loss = straightforward loss (values, gradients, dead counters) on inputs that force the slow paths.

Legend: B = batch, D = d_model, N = latents.
Real activations overflow the fast paths: some tokens put many more than k
large pre-activations in one row (more than its C candidate slots: a spilling
row; more than the largest of `topk.spill_buckets` and the step falls back to dense), and
most latents can be dead (AuxK's slots are then all dead latents, none zero-padded).
Each case is checked against `core/naive.py` for both AuxK variants, and the
path it takes is asserted, so the test cannot drift onto the fast path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.core import losses, naive, sae, topk
from metasae_jax.core.config import TrainConfig

N, D, B, K = 2048, 16, 256, 4  # N wide enough for the slot path: num_candidates * SPARSE_MIN_RATIO <= N
CFG = TrainConfig(d_model=D, width=N, k=K, meta_width=8, meta_k=2, batch_size=B, lambda2=0.0,
                  dead_after_batches=5)


def _inputs(crowded_rows: int, dead_fraction: float):
  """Params, batch and counters; `crowded_rows` tokens each reach ~100 latents far above everything else."""
  # b_dec stays 0 (its init): the fast and straightforward encoders then round identically, so no entry
  # at the BatchTopK threshold can flip between them (b_dec's gradient is still compared).
  keys = jax.random.split(jax.random.PRNGKey(crowded_rows * 1000 + int(dead_fraction * 100)), 4)
  params = sae.init_params(keys[0], D, N)
  x = np.asarray(jax.random.normal(keys[1], (B, D)), np.float64)
  u = np.asarray(sae.standardize(jax.random.normal(keys[2], (1, D)))[0][0], np.float64)
  # Ordinary tokens get no component along u (after standardising too, as u has zero mean), so the
  # crowded columns stay silent on them; crowded tokens are u at distinct scales plus a little noise.
  x -= np.outer(x @ u, u) / (u @ u)
  noise = 0.01 * np.asarray(jax.random.normal(keys[3], (crowded_rows, D)))
  x[:crowded_rows] = np.linspace(1.0, 2.0, crowded_rows)[:, None] * u + noise
  w_enc = np.asarray(params["W_enc"]).copy()
  w_enc[:, :100] = u[:, None] * np.linspace(1.0, 1.5, 100)[None, :] / (u @ u) * 20.0
  params = dict(params, W_enc=jnp.asarray(w_enc, jnp.float32))
  rng = np.random.default_rng(crowded_rows)
  since = jnp.asarray(np.where(rng.random(N) < dead_fraction, 50, 0), jnp.int32)
  return params, jnp.asarray(x, jnp.float32), since


@functools.partial(jax.jit, static_argnames="detach")
def _fast(params, x, since, detach):
  def f(p):
    loss, stats = losses.sae_loss(p, x, since, K, "batchtopk", CFG.aux_k, CFG.aux_coeff,
                                  dead_after_batches=CFG.dead_after_batches, auxk_detach=detach)
    return loss, stats.since_fired_N
  return jax.value_and_grad(f, has_aux=True)(params)


@functools.partial(jax.jit, static_argnames="detach")
def _slow(params, x, since, detach):
  cfg = CFG if not detach else TrainConfig(**dict(CFG.to_dict(), auxk_detach=True))
  (loss, (since_after, _)), grads = jax.value_and_grad(naive.loss, has_aux=True)(params, x, since, cfg, None, 0.0)
  return (loss, since_after), grads


def _path(params, x, since):
  """(spilling rows, dense fallback?, dead latents after this batch) as the fast loss sees them."""
  pre = sae.pre_activations(params, sae.standardize(x)[0])
  cand, _ = topk.candidates(pre, K)
  sel = topk.threshold_from_candidates(cand, pre, K)
  fired = jnp.any(topk.batchtopk_reference(pre, K) > 0, axis=0)
  dead = losses.update_since_fired(since, fired) >= CFG.dead_after_batches
  return int(jnp.sum(sel.spill_B)), bool(sel.dense), int(jnp.sum(dead))


CASES = {
    # name: (crowded rows, fraction of latents idle long enough to be dead, expected paths)
    "slots, few dead": (0, 0.05, "slots", "padded"),
    "spilling rows on the side, most dead": (3, 0.9, "side", "full"),
    "dense fallback, most dead": (topk.SPILL_ROWS + 4, 0.9, "dense", "full"),
    "dense fallback, few dead": (topk.SPILL_ROWS + 4, 0.05, "dense", "padded"),
    # With spill allowances up to B/2 (16, 64, 128 rows), the same rows take the 64-row bucket.
    "spilling rows in a wider bucket, most dead": (topk.SPILL_ROWS + 4, 0.9, "bucket", "full"),
}


@pytest.fixture
def spill_fraction(monkeypatch):
  """Sets topk.MAX_SPILL_FRACTION for one test; jit caches are cleared as the traced constants change."""
  def set_fraction(fraction):
    monkeypatch.setattr(topk, "MAX_SPILL_FRACTION", fraction)
    jax.clear_caches()
  yield set_fraction
  jax.clear_caches()


@pytest.mark.parametrize("detach", [False, True], ids=["reference", "detached"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_loss_equals_naive_on_slow_paths(case, detach, spill_fraction):
  crowded, dead_fraction, spill_path, aux_path = CASES[case]
  if spill_path == "bucket":
    spill_fraction(2)
  widths = topk.spill_buckets(B)
  assert widths == ((16, 64, 128) if spill_path == "bucket" else (16,)), widths
  params, x, since = _inputs(crowded, dead_fraction)
  num_spill, dense, num_dead = _path(params, x, since)
  assert {"slots": lambda: num_spill == 0 and not dense,
          "side": lambda: 0 < num_spill <= widths[0] and not dense,
          "bucket": lambda: widths[0] < num_spill <= widths[1] and not dense,
          "dense": lambda: num_spill > widths[-1] and dense}[spill_path](), (num_spill, dense)
  # padded: fewer dead latents than aux_k, so some AuxK slots hold zeros; full: every slot a dead latent.
  assert (0 < num_dead < CFG.aux_k) if aux_path == "padded" else (num_dead > CFG.aux_k), (num_dead, CFG.aux_k)

  (loss, since_fast), g_fast = _fast(params, x, since, detach)
  (want, since_slow), g_slow = _slow(params, x, since, detach)
  np.testing.assert_allclose(loss, want, rtol=2e-6)
  np.testing.assert_array_equal(since_fast, since_slow)
  for name in ("W_enc", "W_dec", "b_dec"):
    scale = float(jnp.max(jnp.abs(g_slow[name])))
    assert scale > 0
    np.testing.assert_allclose(g_fast[name], g_slow[name], atol=1e-5 * scale, err_msg=name)


def test_detaching_changes_the_gradient_on_the_slow_paths():
  """The two AuxK variants really differ here, so agreeing with naive in both is two checks, not one."""
  params, x, since = _inputs(topk.SPILL_ROWS + 4, 0.9)
  _, g_ref = _fast(params, x, since, False)
  _, g_det = _fast(params, x, since, True)
  diff = float(jnp.max(jnp.abs(g_ref["W_enc"] - g_det["W_enc"])))
  assert diff > 1e-3 * float(jnp.max(jnp.abs(g_ref["W_enc"])))
