"""Tests for metasae_jax.evaluation.plots: every plot is written as a PNG, also with missing metrics.

Legend: N = latents.
"""

import os

import numpy as np

from metasae_jax.evaluation import cooccurrence, plots
from metasae_jax.evaluation.firings import from_index_lists


def test_write_all(tmp_path):
  rng = np.random.default_rng(0)
  f = from_index_lists([rng.choice(6, 2, replace=False) for _ in range(30)], 6)
  stats = {"joint": cooccurrence.phi_stats(f), "solo": cooccurrence.phi_stats(f)}
  per_sae = {"joint": {"fvu": 0.2, "delta_ce_pct": None}, "solo": {"fvu": 0.25, "delta_ce_pct": None}}
  names = plots.write_all(str(tmp_path), stats, per_sae, cosine=rng.uniform(0, 1, 6))
  assert names == ["phi_hist.png", "metrics.png", "matched_cosine.png"]
  for n in names:
    with open(os.path.join(tmp_path, n), "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metric_panels_label_units_and_carry_the_reports_intervals(tmp_path):
  """metrics.png: every panel has a y label; ΔCE bars are ±1.96 SE; the joint-vs-solo panel's bars are the
  bootstrap interval's ends (estimate - low, high - estimate), straight from the report."""
  per_sae = {"joint": {"fvu": 0.13, "fvu_excl_first": 0.4, "mse": 0.2, "l0": 32.0, "delta_ce_pct": 33.5,
                       "delta_ce_pct_se": 1.6, "meta_fve": None},
             "solo": {"fvu": 0.10, "fvu_excl_first": 0.3, "mse": 0.19, "l0": 32.1, "delta_ce_pct": 31.7,
                      "delta_ce_pct_se": 1.5, "meta_fve": None}}
  boot = {"level": 0.95, "mse_pct": {"estimate": 2.4, "low": 2.3, "high": 2.5},
          "fvu_pct": {"estimate": 33.5, "low": 30.0, "high": 38.0},
          "mean_abs_phi_pct": {"estimate": -6.3, "low": -6.5, "high": -6.0}}
  panels = {p.title: p for p in plots.bar_panels(per_sae, {"bootstrap": boot})}
  assert "meta_fve" not in panels and all(p.ylabel for p in panels.values())
  assert panels["fvu"].ylabel.startswith("raw-space FVU") and panels["mse"].ylabel == "MSE on standardised inputs"
  np.testing.assert_allclose(panels["delta_ce_pct"].err_low, [1.959964 * 1.6, 1.959964 * 1.5])
  assert panels["fvu"].err_low is None
  diff = panels["joint vs solo (95% bootstrap interval)"]
  assert diff.labels == ["mean |φ|", "MSE", "raw FVU"] and diff.values == [-6.3, 2.4, 33.5]
  np.testing.assert_allclose(diff.err_low, [0.2, 0.1, 3.5], atol=1e-12)
  np.testing.assert_allclose(diff.err_high, [0.3, 0.1, 4.5], atol=1e-12)
  path = plots.metric_bars(per_sae, str(tmp_path / "metrics.png"), {"bootstrap": boot})
  with open(path, "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
