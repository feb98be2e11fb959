"""Tests for metasae_jax.evaluation.thresholds against a brute-force numpy equal-error-rate search.

Legend: T = tokens, B = batch, D = d_model, N = latents.
"""

import numpy as np
import pytest

from metasae_jax.storage import artifact, loaded_sae, store
from metasae_jax.evaluation import thresholds


def _make(tmp_path, t=96, d=6, n=10, k=3, seed=0, context_len=4):
  rng = np.random.default_rng(seed)
  params = {"W_enc": rng.normal(size=(d, n)).astype(np.float32) / np.sqrt(d),
            "b_enc": np.zeros(n, np.float32),
            "W_dec": rng.normal(size=(n, d)).astype(np.float32),
            "b_dec": rng.normal(size=d).astype(np.float32) * 0.1}
  params["W_enc"][:, -1] = -10.0 * np.abs(params["W_enc"][:, -1])  # nearly never positive
  cfg = {"k": k, "activation": "batchtopk", "input_norm": "standardize_per_token", "source": {}}
  artifact.save_sae(str(tmp_path / "sae"), params, cfg)
  x = rng.normal(size=(t, d)).astype(np.float32)
  st = store.write_store(str(tmp_path / "store"), x, context_len=context_len)
  return loaded_sae.load_sae(str(tmp_path / "sae")), st, x, params


def _brute(x, params, k, batch, skip, context_len, cfg):
  keep = np.arange(len(x)) % context_len >= skip
  x = x[keep].astype(np.float64)
  xs = (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-5)
  pre = np.maximum((xs - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0)
  n = pre.shape[1]
  sel_vals, rej_vals, edges = [[] for _ in range(n)], [[] for _ in range(n)], None
  for s in range(0, len(pre), batch):
    p = pre[s:s + batch]
    kth = np.sort(p.ravel())[::-1][k * len(p) - 1]
    sel = (p >= kth) & (p > 0)
    if edges is None:
      first = p[sel].min()
      edges = thresholds.grid(np.float32(first), cfg)
    for i in range(n):
      sel_vals[i] += list(p[sel[:, i], i])
      rej_vals[i] += list(p[(p[:, i] > 0) & ~sel[:, i], i])
  theta = np.zeros(n)
  for i in range(n):
    s, r = np.array(sel_vals[i]), np.array(rej_vals[i])
    if len(s) == 0:
      theta[i] = np.inf
    elif len(s) < cfg.min_selections or len(r) == 0:
      theta[i] = np.nextafter(np.float32(s.min()), np.float32(-np.inf))
    else:
      gap = [abs((s < e).mean() - (r >= e).mean()) for e in edges]
      theta[i] = edges[int(np.argmin(gap))]
  return theta.astype(np.float32), [len(v) for v in sel_vals]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_matches_brute_force(tmp_path, seed):
  sae, st, x, params = _make(tmp_path, seed=seed)
  cfg = thresholds.CalibrationConfig(batch_size=8, skip_first_positions=1, bins=32, min_selections=5)
  theta, record = thresholds.calibrate(sae, st, cfg, progress=False)
  want, nsel = _brute(x, params, sae.k, 8, 1, 4, cfg)
  np.testing.assert_allclose(theta, want, rtol=1e-5)
  assert record["num_tokens"] == 72 and record["num_dead"] == sum(v == 0 for v in nsel)
  assert record["num_eer"] > 0 and record["skip_first_positions"] == 1


def test_separable_latent_threshold_lies_in_gap():
  # One latent: selected values 2..3, rejected 0.5..1 -> θ between 1 and 2.
  pre = np.concatenate([np.linspace(2, 3, 200), np.linspace(0.5, 1, 200)])[:, None].astype(np.float32)
  sel = pre >= 2
  batch = (pre, sel, sel.sum(0), (~sel).sum(0), np.array([2.0], np.float32))
  cfg = thresholds.CalibrationConfig(bins=64, span=8)
  h = thresholds.accumulate([batch], k=1, cfg=cfg)
  theta, counts = thresholds.eer_thresholds(h, cfg.min_selections)
  assert 1.0 < theta[0] <= 2.0 and counts["num_eer"] == 1


def test_write_into_artifact_roundtrip(tmp_path):
  sae, st, _, _ = _make(tmp_path)
  theta, record = thresholds.calibrate(sae, st, thresholds.CalibrationConfig(batch_size=16), progress=False)
  thresholds.write_into_artifact(sae, theta, record)
  again = loaded_sae.load_sae(sae.path)
  np.testing.assert_array_equal(again.threshold_N, theta)
  assert again.cfg["has_threshold"] and again.cfg["threshold_calibration"]["method"] == record["method"]
  assert np.isinf(theta[-1]) or theta[-1] > 0
