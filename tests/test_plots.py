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
