"""Tests for metasae_jax.evaluation.cooccurrence against brute-force numpy φ (Pearson r of binary firings).

Legend: T = tokens, N = latents.
"""

import itertools

import numpy as np
import pytest

from metasae_jax.evaluation import cooccurrence
from metasae_jax.evaluation.firings import from_index_lists
from metasae_jax.workflows import benchmarking


def _random_firings(t, n, k, seed):
  rng = np.random.default_rng(seed)
  f_TxN = np.zeros((t, n), bool)
  for row in f_TxN:
    row[rng.choice(n, rng.integers(0, k + 1), replace=False, p=np.linspace(1, 3, n) / np.linspace(1, 3, n).sum())] = True
  f_TxN[:, n - 1] = False  # a dead latent
  f_TxN[:, n - 2] = True   # fires on every token: φ undefined, not "live"
  return f_TxN, from_index_lists([np.flatnonzero(r) for r in f_TxN], n)


def _brute_abs_phi(f_TxN):
  t = f_TxN.shape[0]
  live = [i for i in range(f_TxN.shape[1]) if 0 < f_TxN[:, i].sum() < t]
  vals = []
  for i, j in itertools.combinations(live, 2):
    a, b = f_TxN[:, i].astype(float), f_TxN[:, j].astype(float)
    n11, n1i, n1j = (a * b).sum(), a.sum(), b.sum()
    phi = (t * n11 - n1i * n1j) / np.sqrt(n1i * (t - n1i) * n1j * (t - n1j))
    np.testing.assert_allclose(phi, np.corrcoef(a, b)[0, 1], atol=1e-12)
    vals.append(abs(phi))
  return np.array(vals), len(live)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_mean_abs_phi_matches_brute_force(block):
  f_TxN, firings = _random_firings(t=60, n=13, k=5, seed=0)
  want, num_live = _brute_abs_phi(f_TxN)
  got = cooccurrence.phi_stats(firings, block=block, sample_size=10**6)
  assert got.num_live == num_live == 11 and got.num_dead == 1
  assert got.num_live_pairs == len(want) and got.num_pairs == 13 * 12 // 2
  np.testing.assert_allclose(got.mean_abs_phi_live, want.mean(), rtol=1e-10)
  np.testing.assert_allclose(got.var_abs_phi_live, want.var(ddof=1), rtol=1e-8)
  np.testing.assert_allclose(np.sort(got.sample), np.sort(want), rtol=1e-10)
  assert got.hist_counts.sum() == len(want)


def _brute_all_pairs(f_TxN):
  """|φ| of every unordered pair via np.corrcoef, undefined (constant column) pairs set to 0."""
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.corrcoef(f_TxN.T.astype(float))
  iu = np.triu_indices(f_TxN.shape[1], 1)
  return np.nan_to_num(np.abs(r[iu]), nan=0.0)


@pytest.mark.parametrize("num_dead", [0, 3])
def test_all_pairs_mean_counts_dead_pairs_as_zero(num_dead):
  f_TxN, firings = _random_firings(t=80, n=12, k=4, seed=3)
  f_TxN[:, :num_dead] = False
  firings = from_index_lists([np.flatnonzero(r) for r in f_TxN], 12)
  want = _brute_all_pairs(f_TxN)
  live_want, num_live = _brute_abs_phi(f_TxN)
  got = cooccurrence.phi_stats(firings, block=5)
  assert got.num_pairs == len(want) == 66 and got.num_dead == num_dead + 1 and got.num_live == num_live
  np.testing.assert_allclose(got.mean_abs_phi, want.mean(), rtol=1e-10)
  np.testing.assert_allclose(got.var_abs_phi, want.var(ddof=1), rtol=1e-8)
  np.testing.assert_allclose(got.mean_abs_phi_live, live_want.mean(), rtol=1e-10)
  # More dead latents pull the all-pairs mean below the live one.
  assert got.mean_abs_phi < got.mean_abs_phi_live


def test_welch_matches_scipy_on_samples():
  import scipy.stats
  _, fa = _random_firings(40, 9, 4, seed=1)
  _, fb = _random_firings(40, 9, 4, seed=2)
  a = cooccurrence.phi_stats(fa, sample_size=10**6)
  b = cooccurrence.phi_stats(fb, sample_size=10**6)
  t, p = cooccurrence.welch(a, b)
  # The test runs over all pairs: the live sample plus zeros for pairs without a defined φ.
  pad = lambda st: np.concatenate([st.sample, np.zeros(st.num_pairs - st.num_live_pairs)])
  ref = scipy.stats.ttest_ind(pad(a), pad(b), equal_var=False)
  np.testing.assert_allclose([t, p], [ref.statistic, ref.pvalue], rtol=1e-6)


def test_cross_phi_matches_brute_force():
  fa_TxN, fa = _random_firings(50, 7, 3, seed=3)
  fb_TxN, fb = _random_firings(50, 6, 3, seed=4)
  fb_TxN[:, 0] = fa_TxN[:, 1]  # b's latent 0 duplicates a's latent 1: φ = 1
  fb = from_index_lists([np.flatnonzero(r) for r in fb_TxN], 6)
  got = cooccurrence.cross_phi(fa, fb, top=3, threshold=0.3, pairs_a=np.array([1, 2]),
                               pairs_b=np.array([0, 3]), block=2)
  with np.errstate(invalid="ignore", divide="ignore"):
    ref_SxN = np.array([[np.corrcoef(fb_TxN[:, s], fa_TxN[:, i])[0, 1] for i in range(7)] for s in range(6)])
  assert got.top_idx_SxK[0, 0] == 1
  np.testing.assert_allclose(got.top_phi_SxK[0, 0], 1.0)
  for s in range(6):
    finite = np.where(np.isnan(ref_SxN[s]), -np.inf, ref_SxN[s])
    want = np.sort(finite)[::-1][:3]
    np.testing.assert_allclose(np.where(np.isfinite(want), want, np.nan), got.top_phi_SxK[s], rtol=1e-10, atol=1e-12)
    assert got.num_above_S[s] == (finite >= 0.3).sum()
  np.testing.assert_allclose(got.pair_phi, [ref_SxN[0, 1], ref_SxN[3, 2]], rtol=1e-10, atol=1e-12)


def test_synthetic_firings_shape():
  f = benchmarking.synthetic_firings(width=200, num_tokens=300, k=8, seed=0)
  lens = np.diff(f.indptr_T1)
  assert f.num_tokens == 300 and lens.max() <= 8 and lens.mean() > 7
  for t in range(5):
    row = f.latents_F[f.indptr_T1[t]:f.indptr_T1[t + 1]]
    assert len(np.unique(row)) == len(row)
