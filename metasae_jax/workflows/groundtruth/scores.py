"""Scores of one SAE against the true dictionary, in the standardised space the SAE sees.

Legend: T = held-out tokens, D = d_model, F = true features, N = SAE latents, S = a candidate feature set.
Every score is defined in docs/groundtruth.md; the constants below are its thresholds.
"""

import itertools
from typing import Optional

import numpy as np

from metasae_jax.evaluation.cooccurrence import phi_from_counts
from metasae_jax.workflows.groundtruth.scenarios import unit_rows

ATOM_COS = 0.9
"""A decoder row recovers a true feature when their cosine exceeds this (the issue's definition)."""
FIT_COS = 0.9
"""A latent is close to a combination of true features when their non-negative fit reaches this cosine."""
MIN_SHARE = 0.2
"""Each member of a composite carries at least this fraction of the largest member's coefficient."""
CANDIDATES = 6
"""Composites are searched among a latent's most similar true features (pairs and triples of these)."""
PURE = 0.9
"""Firing purity at or above which a latent counts as pure, and coverage for a cleanly recovered feature."""
SPLIT_COVERAGE = 0.1
"""A latent takes part in splitting a feature when it covers at least this fraction of the feature's firings."""


def centre_rows(w_NxD: np.ndarray) -> np.ndarray:
  """Unit rows in the zero-mean subspace: the only part of a decoder row that standardised inputs use."""
  w = np.asarray(w_NxD, np.float64)
  return unit_rows(w - w.mean(axis=1, keepdims=True))


def nonneg_fit(u_D: np.ndarray, basis_SxD: np.ndarray) -> tuple:
  """Least-squares coefficients of u on the basis rows, and the cosine of the fit (nan when a coef < 0)."""
  coef_S, *_ = np.linalg.lstsq(basis_SxD.T, u_D, rcond=None)
  if np.any(coef_S < 0):
    return coef_S, float("nan")
  fit_D = coef_S @ basis_SxD
  norm = np.linalg.norm(fit_D)
  return coef_S, float(fit_D @ u_D / (norm * np.linalg.norm(u_D))) if norm > 0 else float("nan")


def composite_set(u_D: np.ndarray, truth_FxD: np.ndarray, cos_F: np.ndarray) -> Optional[tuple]:
  """The smallest set (2 or 3 features, best fit first) whose non-negative sum explains u; None if none."""
  if cos_F.max() > ATOM_COS:
    return None
  top = np.argsort(-cos_F)[:CANDIDATES]
  for size in (2, 3):
    best = None
    for s in itertools.combinations(top, size):
      coef, fit = nonneg_fit(u_D, truth_FxD[list(s)])
      if np.isfinite(fit) and fit >= FIT_COS and coef.min() >= MIN_SHARE * coef.max():
        if best is None or fit > best[0]:
          best = (fit, tuple(sorted(int(i) for i in s)))
    if best is not None:
      return best[1]
  return None


def mean_abs_phi(fired_TxN: np.ndarray) -> float:
  """Mean |φ| over all N(N-1)/2 pairs; a pair with a latent that never (or always) fires counts 0."""
  f = fired_TxN.astype(np.float64)
  n = f.shape[1]
  if n < 2:
    return 0.0
  n1_N = f.sum(0)
  phi_NxN = np.nan_to_num(phi_from_counts(f.T @ f, n1_N, n1_N, f.shape[0]), nan=0.0)
  iu = np.triu_indices(n, 1)
  return float(np.abs(phi_NxN[iu]).mean())


def score(w_dec_NxD: np.ndarray, fired_TxN: np.ndarray, truth_FxD: np.ndarray, on_TxF: np.ndarray,
          pairs=(), parent_of: Optional[dict] = None, mse: float = float("nan")) -> dict:
  """All ground-truth scores of one SAE.

  `truth_FxD` are the true directions already standardised (scenarios.standardized_directions);
  `fired_TxN` / `on_TxF` say which latents fired and which true features were on, per held-out token.
  """
  fired = np.asarray(fired_TxN, bool)
  on = np.asarray(on_TxF, bool)
  t, n = fired.shape
  f_count = truth_FxD.shape[0]
  truth = centre_rows(truth_FxD)
  fires_N = fired.sum(0)
  live_N = fires_N > 0
  dec = centre_rows(w_dec_NxD)
  cos_NxF = dec @ truth.T
  live_cos = cos_NxF[live_N]
  best_F = live_cos.max(0) if live_N.any() else np.zeros(f_count)
  # Atoms: true features that some live latent's decoder matches.
  atoms = int((best_F > ATOM_COS).sum())
  composites, structured = [], 0
  pair_set = {tuple(sorted(p)) for p in pairs}
  for i in np.flatnonzero(live_N):
    s = composite_set(dec[i], truth, cos_NxF[i])
    if s is not None:
      composites.append(s)
      structured += int(len(s) == 2 and s in pair_set)
  absorbing = None
  if parent_of:
    # A child latent whose decoder also carries its parent: for its most similar child c, the non-negative
    # fit on {c, parent(c)} explains the row and each of the two carries >= MIN_SHARE of the other's weight.
    children = np.array(sorted(parent_of))
    absorbing = 0
    for i in np.flatnonzero(live_N):
      c = int(children[np.argmax(cos_NxF[i, children])])
      coef, fit = nonneg_fit(dec[i], truth[[c, parent_of[c]]])
      absorbing += int(np.isfinite(fit) and fit >= FIT_COS and coef[1] >= MIN_SHARE * coef[0]
                       and coef[0] >= MIN_SHARE * coef[1])
  # Firing purity and coverage: co-firing counts of latents with true features.
  both_NxF = fired.T.astype(np.float64) @ on.astype(np.float64)
  on_F = on.sum(0).astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    precision_NxF = both_NxF / fires_N[:, None]          # P(feature on | latent fires)
    coverage_NxF = both_NxF / on_F[None, :]              # P(latent fires | feature on)
    jaccard_NxF = both_NxF / (fires_N[:, None] + on_F[None, :] - both_NxF)
  purity_N = np.where(live_N, np.nan_to_num(precision_NxF).max(1), np.nan)
  # Ground-truth split analysis: each live latent belongs to the true feature its firings match best
  # (Jaccard), if at least half of its firings are that feature's.
  jac = np.nan_to_num(jaccard_NxF)
  owner_N = np.where(live_N, jac.argmax(1), -1)
  owner_ok_N = live_N & (np.nan_to_num(precision_NxF)[np.arange(n), np.maximum(owner_N, 0)] >= 0.5)
  cov = np.nan_to_num(coverage_NxF)
  prec = np.nan_to_num(precision_NxF)
  split, clean, per_feature = 0, 0, []
  for f in range(f_count):
    if on_F[f] == 0:
      continue
    mine = np.flatnonzero(owner_ok_N & (owner_N == f))
    splitters = mine[cov[mine, f] >= SPLIT_COVERAGE]
    per_feature.append(len(mine))
    split += int(len(splitters) >= 2)
    clean += int(np.any((prec[:, f] >= PURE) & (cov[:, f] >= PURE) & live_N))
  observed = max(1, int((on_F > 0).sum()))
  return {
      "atoms_recovered": atoms,
      "recovery": atoms / f_count,
      "mean_max_cos": float(best_F.mean()),
      "composite_latents": len(composites),
      "structured_composites": structured,
      "absorbing_latents": absorbing,
      "purity": float(np.nanmean(purity_N)) if live_N.any() else 0.0,
      "pure_fraction": float(np.mean(purity_N[live_N] >= PURE)) if live_N.any() else 0.0,
      # Every firing counts once, so latents that die (or barely fire) cannot move it.
      "purity_weighted": float(both_NxF.max(1).sum() / fires_N.sum()) if fires_N.sum() else 0.0,
      "split_features": split,
      "split_fraction": split / observed,
      "clean_features": clean,
      "clean_fraction": clean / observed,
      "latents_per_feature": float(np.mean(per_feature)) if per_feature else 0.0,
      "mean_abs_phi": mean_abs_phi(fired),
      "mse": float(mse),
      "l0": float(fired.sum() / t),
      "dead_fraction": float(1.0 - live_N.mean()),
  }
