"""Tests for metasae_jax.evaluation.reconstruction and the held-out skip rule against brute-force numpy.

Legend: T = tokens, D = d_model, N = latents.
"""

import numpy as np
import pytest

from metasae_jax.storage import artifact, loaded_sae, store
from metasae_jax.evaluation import reconstruction


def _sae(tmp_path, d=5, n=12, k=2, seed=0):
  rng = np.random.default_rng(seed)
  params = {"W_enc": rng.normal(size=(d, n)).astype(np.float32), "b_enc": np.zeros(n, np.float32),
            "W_dec": rng.normal(size=(n, d)).astype(np.float32) * 0.3, "b_dec": np.zeros(d, np.float32)}
  params["W_enc"][:, 0] = -100.0  # latent 0 never fires
  artifact.save_sae(str(tmp_path / "sae"), params, {"k": k, "activation": "batchtopk",
                                                   "input_norm": "standardize_per_token", "source": {}})
  return loaded_sae.load_sae(str(tmp_path / "sae")), params


def _brute(x, params, k, batch, typical=None):
  sq, sq_std, active, fired = 0.0, 0.0, 0, np.zeros(params["W_enc"].shape[1], bool)
  for s in range(0, len(x), batch):
    xb = x[s:s + batch].astype(np.float64)
    mean, std = xb.mean(1, keepdims=True), xb.std(1, ddof=1, keepdims=True)
    xs = (xb - mean) / (std + 1e-5)
    pre = np.maximum((xs - params["b_dec"]) @ params["W_enc"], 0)
    kth = np.sort(pre.ravel())[::-1][k * len(pre) - 1]
    acts = np.where((pre >= kth) & (pre > 0), pre, 0)
    rs = acts @ params["W_dec"] + params["b_dec"]
    err_B = np.square(xb - (rs * std + mean)).sum(1)
    sq += err_B.sum()
    if typical is not None:
      typical["err"] += err_B[typical["keep"][s:s + batch]].sum()
    sq_std += np.square(xs - rs).sum()
    active += (acts > 0).sum()
    fired |= (acts > 0).any(0)
  return {"fvu": sq / np.square(x - x.mean(0)).sum(), "mse": sq_std / x.size, "l0": active / len(x),
          "dead_fraction": 1 - fired.mean()}


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_metrics_match_brute_force(tmp_path, skip):
  sae, params = _sae(tmp_path)
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(40, 5)) * [1, 2, 3, 4, 5] + 3).astype(np.float32)
  st = store.write_store(str(tmp_path / "store"), x, context_len=8, shard_tokens=16)
  got = reconstruction.evaluate(sae, st, 0, batch_size=6, skip_first_positions=skip, firing="batchtopk",
                                progress=False)
  kept = x[np.arange(40) % 8 >= skip]
  want = _brute(kept, params, 2, 6)
  assert got["num_tokens"] == len(kept)
  for key, val in want.items():
    np.testing.assert_allclose(got[key], val, rtol=2e-4, err_msg=key)
  assert got["dead_fraction"] >= 1 / 12


def test_fvu_typical_leaves_out_sink_like_outliers(tmp_path):
  sae, params = _sae(tmp_path)
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(48, 5)) * [1, 2, 3, 4, 5] + 3).astype(np.float32)
  x[[9, 30]] *= 500.0  # two attention-sink-like tokens away from position 0
  st = store.write_store(str(tmp_path / "store"), x, context_len=1, shard_tokens=16)
  got = reconstruction.evaluate(sae, st, 0, batch_size=12, skip_first_positions=0, firing="batchtopk",
                                progress=False)
  norms = np.linalg.norm(x.astype(np.float64), axis=1)
  keep = norms <= reconstruction.OUTLIER_FACTOR * np.median(norms[:12])
  assert got["outlier_tokens"] == 2 == int((~keep).sum())
  typical = {"keep": keep, "err": 0.0}
  want = _brute(x, params, 2, 12, typical)
  np.testing.assert_allclose(got["fvu"], want["fvu"], rtol=2e-4)
  xt = x[keep].astype(np.float64)
  np.testing.assert_allclose(got["fvu_typical"], typical["err"] / np.square(xt - xt.mean(0)).sum(), rtol=2e-4)
  # The outliers' part of the raw FVU and of the raw variance, over the all-token denominator.
  denom_T = np.square(x.astype(np.float64) - x.astype(np.float64).mean(0)).sum(1)
  np.testing.assert_allclose(got["fvu_outliers"], want["fvu"] - typical["err"] / denom_T.sum(), rtol=2e-4)
  np.testing.assert_allclose(got["outlier_variance_share"], denom_T[~keep].sum() / denom_T.sum(), rtol=1e-6)
  assert 0.9 < got["outlier_variance_share"] < 1
