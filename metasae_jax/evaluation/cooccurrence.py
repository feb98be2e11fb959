"""Co-occurrence of latent firings: mean |φ| over all pairs (and over live pairs), and cross-φ between two SAEs.

Legend: T = evaluation tokens, N = latents (M = the other SAE's), W = latents in a row block.
φ_ij = (T·N11 − N1i·N1j) / sqrt(N1i(T−N1i)·N1j(T−N1j)) (docs/method.md §2.3). Pairs that never co-occur
have N11 = 0 but a nonzero φ, so every pair is visited: the N11 counts of a block of W rows come
from one sparse product F[:, block]^T F (scipy, int counts) and become φ straight away, so no
N x N matrix is ever held. The headline mean |φ| is over all N(N−1)/2 pairs, a pair with a latent
whose φ is undefined (dead, or firing on every token) counting as φ = 0 (the paper's convention,
docs/method.md §2.3); the live-only mean is reported beside it because the two move apart when SAEs differ in
dead latents.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import numpy as np
import scipy.sparse as sp
import scipy.stats
from tqdm import tqdm

from metasae_jax.evaluation.firings import Firings, from_index_lists

# Histogram of log10 |φ| (|φ| below 1e-7, including exact zeros, lands in the first bin).
LOG10_MIN, LOG10_MAX, NUM_BINS = -7.0, 0.0, 140


class PhiStats(NamedTuple):
  """Moments of |φ| over all pairs (headline) and over live pairs, with a histogram and sample of live pairs."""
  mean_abs_phi: float       # over all N(N−1)/2 pairs, undefined φ counted as 0
  var_abs_phi: float
  num_pairs: int            # N(N−1)/2
  num_live: int             # latents with a defined φ
  hist_counts: np.ndarray   # [NUM_BINS] over log10 |φ| of live pairs
  hist_edges: np.ndarray    # [NUM_BINS + 1] log10 edges
  sample: np.ndarray        # |φ| of up to `sample_size` uniformly drawn live pairs
  mean_abs_phi_live: float = float("nan")
  var_abs_phi_live: float = float("nan")
  num_live_pairs: int = 0
  num_dead: int = 0         # latents that never fired

  def summary(self) -> dict:
    return {"mean_abs_phi": self.mean_abs_phi, "var_abs_phi": self.var_abs_phi, "num_pairs": self.num_pairs,
            "mean_abs_phi_live": self.mean_abs_phi_live, "var_abs_phi_live": self.var_abs_phi_live,
            "num_live_pairs": self.num_live_pairs, "num_live": self.num_live, "num_dead": self.num_dead}


def _moments(s1: float, s2: float, count: int) -> tuple[float, float]:
  """Mean and unbiased variance from the sum and sum of squares of `count` values."""
  if count == 0:
    return float("nan"), float("nan")
  mean = s1 / count
  return mean, max(0.0, (s2 - count * mean * mean) / max(1, count - 1))


def live_mask(counts_N: np.ndarray, num_tokens: int) -> np.ndarray:
  """Latents with a defined φ: fired at least once, and not on every token."""
  return (counts_N > 0) & (counts_N < num_tokens)


def phi_from_counts(n11, n1_row, n1_col, num_tokens: int) -> np.ndarray:
  """Elementwise φ from co-occurrence counts (float64; undefined entries give nan)."""
  t = float(num_tokens)
  n1_row = np.asarray(n1_row, np.float64)
  n1_col = np.asarray(n1_col, np.float64)
  num = t * np.asarray(n11, np.float64) - n1_row[:, None] * n1_col[None, :]
  den = np.sqrt((n1_row * (t - n1_row))[:, None] * (n1_col * (t - n1_col))[None, :])
  with np.errstate(divide="ignore", invalid="ignore"):
    return num / den


def _blocks(n: int, block: int):
  return [(a, min(n, a + block)) for a in range(0, n, block)]


def phi_stats(firings: Firings, block: int = 1024, sample_size: int = 100_000, seed: int = 0,
              workers: int = 2, progress: bool = False) -> PhiStats:
  """Exact mean and variance of |φ| over all unordered pairs and over pairs of live latents."""
  n, t = firings.width, firings.num_tokens
  counts_N = firings.counts_N()
  live_N = live_mask(counts_N, t)
  num_live = int(live_N.sum())
  num_dead = int((counts_N == 0).sum())
  num_all = n * (n - 1) // 2
  num_pairs = num_live * (num_live - 1) // 2
  edges = np.linspace(LOG10_MIN, LOG10_MAX, NUM_BINS + 1)
  if num_pairs == 0:
    zero_all = _moments(0.0, 0.0, num_all)
    return PhiStats(*zero_all, num_all, num_live, np.zeros(NUM_BINS, np.int64), edges, np.zeros(0),
                    float("nan"), float("nan"), 0, num_dead)
  # Only live latents take part: drop the rest and renumber columns.
  keep = np.flatnonzero(live_N)
  f_csr = firings.csr()[:, keep].tocsr()
  f_csc = f_csr.tocsc()
  n1 = counts_N[keep]
  p_sample = min(1.0, sample_size / num_pairs)

  def one_block(ab):
    a, b = ab
    # Upper triangle only: rows a..b against columns a.. (the i < j pairs of this block).
    n11_WxM = (f_csc[:, a:b].T.tocsr() @ f_csr[:, a:]).toarray()
    phi = np.abs(phi_from_counts(n11_WxM, n1[a:b], n1[a:], t))
    upper = np.arange(a, b)[:, None] < np.arange(a, num_live)[None, :]
    vals = phi[upper]
    hist = np.bincount(np.clip(((np.log10(np.maximum(vals, 1e-300)) - LOG10_MIN)
                                / (LOG10_MAX - LOG10_MIN) * NUM_BINS).astype(np.int64), 0, NUM_BINS - 1),
                       minlength=NUM_BINS)
    rng = np.random.default_rng([seed, a])
    sample = vals[rng.random(len(vals)) < p_sample] if p_sample < 1 else vals
    return float(vals.sum()), float(np.square(vals).sum()), hist, sample

  blocks = _blocks(num_live, block)
  with ThreadPoolExecutor(max(1, workers)) as ex:
    results = list(tqdm(ex.map(one_block, blocks), total=len(blocks), desc="phi", disable=not progress))
  s1 = sum(r[0] for r in results)
  s2 = sum(r[1] for r in results)
  hist = np.sum([r[2] for r in results], axis=0)
  sample = np.concatenate([r[3] for r in results])
  # Pairs outside the live set add zeros: same sums, more pairs.
  return PhiStats(*_moments(s1, s2, num_all), num_all, num_live, hist, edges, sample,
                  *_moments(s1, s2, num_pairs), num_pairs, num_dead)


def welch(a: PhiStats, b: PhiStats) -> tuple[float, float]:
  """Welch's t-test of mean |φ| over all pairs (a vs b), from exact moments.

  Treats the pairs as independent samples, which they are not (pairs share latents and tokens): the
  paper's test, kept for comparison; the block bootstrap (evaluation/bootstrap.py) is the defensible one.
  """
  if a.num_pairs < 2 or b.num_pairs < 2:
    return float("nan"), float("nan")
  res = scipy.stats.ttest_ind_from_stats(a.mean_abs_phi, np.sqrt(a.var_abs_phi), a.num_pairs,
                                         b.mean_abs_phi, np.sqrt(b.var_abs_phi), b.num_pairs,
                                         equal_var=False)
  return float(res.statistic), float(res.pvalue)


class CrossPhi(NamedTuple):
  """For each latent s of SAE b: its `top` most correlated latents of SAE a, and how many pass `threshold`."""
  top_idx_SxK: np.ndarray     # int64 indices into SAE a (-1 where undefined)
  top_phi_SxK: np.ndarray     # float64, descending
  num_above_S: np.ndarray     # int64, latents of a with cross-φ >= threshold
  pair_phi: Optional[np.ndarray]  # cross-φ of the given (a, b) pairs


def cross_phi(firings_a: Firings, firings_b: Firings, top: int = 8, threshold: float = 0.2,
              pairs_a: Optional[np.ndarray] = None, pairs_b: Optional[np.ndarray] = None,
              block: int = 1024, workers: int = 2, progress: bool = False) -> CrossPhi:
  """Cross-φ between the firings of two SAEs on the same tokens (row s of b against all of a)."""
  if not np.array_equal(firings_a.index_T, firings_b.index_T):
    raise ValueError("cross-φ needs both SAEs' firings on the same tokens")
  t = firings_a.num_tokens
  n1_a, n1_b = firings_a.counts_N(), firings_b.counts_N()
  fa_csr = firings_a.csr()
  fb_csc = firings_b.csr().tocsc()
  m, n_b = firings_a.width, firings_b.width
  top = min(top, m)
  top_idx = np.full((n_b, top), -1, np.int64)
  top_phi = np.full((n_b, top), np.nan)
  above = np.zeros(n_b, np.int64)
  pair_phi = None if pairs_a is None else np.full(len(pairs_a), np.nan)
  pair_of_b = {} if pairs_b is None else {int(s): i for i, s in enumerate(pairs_b)}

  def one_block(ab):
    a, b = ab
    n11_WxM = (fb_csc[:, a:b].T.tocsr() @ fa_csr).toarray()
    phi = phi_from_counts(n11_WxM, n1_b[a:b], n1_a, t)
    phi_filled = np.where(np.isnan(phi), -np.inf, phi)
    idx = np.argpartition(-phi_filled, top - 1, axis=1)[:, :top]
    vals = np.take_along_axis(phi_filled, idx, axis=1)
    order = np.argsort(-vals, axis=1)
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    top_idx[a:b] = np.where(np.isfinite(vals), idx, -1)
    top_phi[a:b] = np.where(np.isfinite(vals), vals, np.nan)
    above[a:b] = (phi_filled >= threshold).sum(axis=1)
    if pair_phi is not None:
      for s in range(a, b):
        if s in pair_of_b:
          i = pair_of_b[s]
          pair_phi[i] = phi[s - a, pairs_a[i]]

  blocks = _blocks(n_b, block)
  with ThreadPoolExecutor(max(1, workers)) as ex:
    list(tqdm(ex.map(one_block, blocks), total=len(blocks), desc="cross-phi", disable=not progress))
  return CrossPhi(top_idx, top_phi, above, pair_phi)


__all__ = ["PhiStats", "CrossPhi", "phi_stats", "cross_phi", "welch", "phi_from_counts", "live_mask",
           "from_index_lists"]
