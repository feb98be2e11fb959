"""The scores and the paired report against hand-computed values, brute force and scipy."""

import itertools

import numpy as np
import pytest
import scipy.stats

from metasae_jax.autointerp import report, scorers


def test_spearman_hand_computed():
  # ranks(pred) = [1, 2, 3, 4], ranks(actual) = [1, 3, 2, 4]: d^2 = 0+1+1+0, rho = 1 - 6*2/(4*15) = 0.8.
  rho, defined = scorers.fuzz_spearman([1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 2.0, 9.0])
  assert defined and rho == pytest.approx(0.8)


def test_spearman_failed_answers_count_against():
  # Actuals [0, 1, 2, 3], median 1.5: the failed example (actual 3) gets prediction 0.
  rho, _ = scorers.fuzz_spearman([0.0, 1.0, 2.0, None], [0.0, 1.0, 2.0, 3.0])
  # pred [0, 1, 2, 0] -> ranks [1.5, 3, 4, 1.5]; actual ranks [1, 2, 3, 4]; Pearson of the ranks:
  # cov = 0.5, var = 4.5 and 5 (sums of squared deviations), rho = 0.5 / sqrt(22.5).
  assert rho == pytest.approx(0.5 / 22.5 ** 0.5, abs=1e-12)


def test_spearman_constant_is_chance():
  assert scorers.fuzz_spearman([5.0, 5.0, 5.0], [0.0, 1.0, 2.0]) == (0.0, False)


def test_balanced_accuracy_hand_computed():
  # positives: 0.9 right, 0.2 wrong, None wrong -> 1/3; negatives: 0.1 right, 0.6 wrong -> 1/2.
  got = scorers.balanced_accuracy([0.9, 0.2, None, 0.1, 0.6], [True, True, True, False, False])
  assert got == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert scorers.balanced_accuracy([1.0, 0.0], [True, False]) == 1.0
  assert scorers.balanced_accuracy([0.0, 1.0], [True, False]) == 0.0


def test_paired_report():
  joint = [{"fuzz_spearman": s, "fuzz_balanced_accuracy": 0.5, "detection_balanced_accuracy": 0.5}
           for s in (0.5, 0.3, 0.1)]
  solo = [{"fuzz_spearman": s, "fuzz_balanced_accuracy": 0.5, "detection_balanced_accuracy": 0.5}
          for s in (0.2, 0.4, 0.0)]
  out = report.paired(joint, solo)
  fs = out["fuzz_spearman"]
  # differences 0.3, -0.1, 0.1: mean 0.1, sd 0.2, t = 0.1 / (0.2 / sqrt 3).
  assert fs["mean_difference"] == pytest.approx(0.1)
  assert fs["t"] == pytest.approx(0.1 / (0.2 / 3 ** 0.5))
  assert 0 < fs["p"] < 1
  assert fs["joint_win_fraction"] == pytest.approx(2 / 3)
  ba = out["fuzz_balanced_accuracy"]
  assert ba["t"] is None and ba["p"] is None and ba["tie_fraction"] == 1.0
  summary = report.sae_summary(joint)
  assert summary["fuzz_spearman"] == pytest.approx(0.3) and summary["num_latents"] == 3


def _wilcoxon_exact_p(d):
  """Two-sided exact signed-rank p by enumerating all 2^n sign flips (distinct nonzero |d|)."""
  d = np.asarray(d, np.float64)
  ranks = scipy.stats.rankdata(np.abs(d))
  w_plus = ranks[d > 0].sum()
  n = len(d)
  signs = np.array(list(itertools.product([0, 1], repeat=n)), np.float64)
  dist = signs @ ranks
  mean = ranks.sum() / 2
  return float(np.mean(np.abs(dist - mean) >= abs(w_plus - mean) - 1e-12))


def test_paired_tests_against_independent_computations():
  rng = np.random.default_rng(3)
  a = rng.normal(0.3, 0.2, size=9)
  b = a - rng.normal(0.05, 0.1, size=9)
  joint = [{"fuzz_spearman": x, "fuzz_balanced_accuracy": 0.5, "detection_balanced_accuracy": x} for x in a]
  solo = [{"fuzz_spearman": x, "fuzz_balanced_accuracy": 0.5, "detection_balanced_accuracy": x} for x in b]
  joint.append({"fuzz_spearman": None, "fuzz_balanced_accuracy": None,
                "detection_balanced_accuracy": None})  # unscored: left out, not a zero
  solo.append({"fuzz_spearman": 0.9, "fuzz_balanced_accuracy": 0.9, "detection_balanced_accuracy": 0.9})
  e = report.paired(joint, solo)["fuzz_spearman"]
  d = a - b
  t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
  assert e["num_scored"] == 9 and e["mean_difference"] == pytest.approx(d.mean())
  assert e["t"] == pytest.approx(t) and e["p"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), len(d) - 1))
  assert e["wilcoxon_p"] == pytest.approx(_wilcoxon_exact_p(d))
  assert e["joint"]["mean"] == pytest.approx(a.mean()) and e["solo"]["mean"] == pytest.approx(b.mean())
  assert e["differences"] == pytest.approx(list(d))
  ba = report.paired(joint, solo)["fuzz_balanced_accuracy"]
  assert ba["p"] is None and ba["wilcoxon_p"] is None and ba["tie_fraction"] == 1.0


@pytest.mark.parametrize("n,seed", [(12, 0), (40, 1)])
def test_bootstrap_interval_matches_scipy(n, seed):
  x = np.random.default_rng(seed).exponential(1.0, size=n)
  lo, hi = report.bootstrap_mean_ci(x, seed=seed)
  ref = scipy.stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=20000,
                              method="percentile", rng=np.random.default_rng(100 + seed)).confidence_interval
  # Both are Monte Carlo estimates of the same quantiles: agree to a small fraction of the standard error.
  se = x.std(ddof=1) / np.sqrt(n)
  assert abs(lo - ref.low) < 0.1 * se and abs(hi - ref.high) < 0.1 * se
  assert lo < x.mean() < hi
  assert report.bootstrap_mean_ci([0.4]) == (0.4, 0.4) and report.bootstrap_mean_ci([]) == (None, None)


def test_report_markdown_has_the_paired_table():
  lat = lambda v: {"fuzz_spearman": v, "fuzz_balanced_accuracy": v, "detection_balanced_accuracy": v}
  joint, solo = [lat(v) for v in (0.5, 0.3, 0.2)], [lat(v) for v in (0.4, 0.1, 0.3)]
  scores = {"llm": "x", "num_tokens": 10, "paired": report.paired(joint, solo), "llm_requests": 3,
            "llm_cache_hits": 0}
  md = report.report_markdown(scores)
  row = [line for line in md.splitlines() if line.startswith("| detection")][0]
  lo, hi = report.bootstrap_mean_ci([0.1, 0.2, -0.1], seed=2)
  assert f"0.067 [{lo:.3f}, {hi:.3f}]" in row and "| 3 |" in row
