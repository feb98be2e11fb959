"""Both scores and the paired report against hand-computed values."""

import pytest

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
  joint = [{"fuzz_spearman": s, "fuzz_balanced_accuracy": 0.5} for s in (0.5, 0.3, 0.1)]
  solo = [{"fuzz_spearman": s, "fuzz_balanced_accuracy": 0.5} for s in (0.2, 0.4, 0.0)]
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
