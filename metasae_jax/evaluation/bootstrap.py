"""Block bootstrap over whole contexts of held-out tokens: intervals for joint-vs-solo Δ mean |φ| %, ΔMSE %, ΔFVU %.

Legend: T = evaluation tokens, B = tokens in a batch, N = latents, D = d_model, G = blocks of contexts,
P = latent pairs that co-occur on some token, R = bootstrap replicates.
Assumption: contexts are independent draws from the corpus, tokens inside a context are not; so the
unit resampled is a block of whole consecutive contexts, drawn G times with replacement, and the same
draw weights joint and solo (they see the same tokens: a paired comparison). The interval is the
BCa interval of the replicate statistic (bias- and skew-corrected percentiles; the acceleration comes
from leaving one block out at a time), as mean |φ|'s replicates sit off-centre of its point estimate.
What is recomputed per replicate: every statistic exactly, from per-block sufficient statistics
(no second pass over the data). Reconstruction: per block token count, squared errors (raw and
standardised), Σx and Σ|x|². φ: per block latent counts N1 and co-occurrence counts N11 of the pairs
that co-occur anywhere (sparse, G x P); pairs that never co-occur have N11 = 0 in every replicate,
so their |φ| = g_i·g_j with g = sqrt(N1 / (T − N1)) and their sum comes from Σg (O(N) per replicate).
The co-occurrence counts cost ~Σ_t k_t²/2 entries; past `max_pair_entries` the φ bootstrap uses the
leading contexts that fit (a smaller held-out set: a wider, conservative interval) and says so.
"""

import dataclasses
from typing import NamedTuple, Optional

import numpy as np
import scipy.sparse as sp
from scipy import special

from metasae_jax.core.errors import UserError
from metasae_jax.evaluation.firings import Firings
from metasae_jax.storage import positions
from metasae_jax.storage.store_types import Store


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
  """How the joint-vs-solo intervals are computed."""
  replicates: int = 200
  """Bootstrap replicates (0 skips the bootstrap); the 2.5 % / 97.5 % percentiles settle by ~200."""
  num_blocks: int = 64
  """Blocks of whole consecutive contexts the held-out set is cut into (fewer if it has fewer contexts)."""
  level: float = 0.95
  """Coverage of the interval (BCa; percentile where the jackknife cannot be formed)."""
  max_pair_entries: int = 20_000_000
  """Budget of per-block co-occurrence entries (~Σ_t k_t²/2) for the φ bootstrap (~24 B each, and
  each replicate touches every one)."""
  seed: int = 0

  def __post_init__(self):
    if self.replicates < 0 or self.num_blocks < 2 or not 0 < self.level < 1 or self.max_pair_entries < 1:
      raise UserError("bootstrap needs replicates >= 0, num_blocks >= 2, 0 < level < 1, max_pair_entries >= 1.")


class BlockLayout:
  """Maps global store token indices to (block of whole contexts, is-first-position)."""

  def __init__(self, store: Store, num_tokens: int, skip_first_positions: int, num_blocks: int):
    self.context_len = max(1, int(store.context_len))
    self.offsets = np.asarray(store.segment_offsets, np.int64)
    # Contexts restart in every segment (format-1 shard): context ids are numbered segment after segment.
    per_segment = [-(-int(n) // self.context_len) for n in np.diff(self.offsets)]
    self.context_offsets = np.concatenate([[0], np.cumsum(per_segment)]).astype(np.int64)
    last = self._last_used(store, num_tokens, skip_first_positions)
    used_contexts = int(self.context_of(np.array([last]))[0]) + 1
    self.contexts_per_block = max(1, -(-used_contexts // num_blocks))
    self.num_blocks = -(-used_contexts // self.contexts_per_block)

  @staticmethod
  def _last_used(store: Store, num_tokens: int, skip_first_positions: int) -> int:
    """Global index of the last token evaluated (the first num_tokens kept tokens, in store order)."""
    if num_tokens <= 0:
      return 0
    return int(positions.KeptTokens(store, skip_first_positions).kept_to_global(np.array([num_tokens - 1]))[0])

  def context_of(self, index_B: np.ndarray) -> np.ndarray:
    index_B = np.asarray(index_B, np.int64)
    s = np.searchsorted(self.offsets, index_B, side="right") - 1
    return self.context_offsets[s] + (index_B - self.offsets[s]) // self.context_len

  def block_of(self, index_B: np.ndarray) -> np.ndarray:
    return np.minimum(self.context_of(index_B) // self.contexts_per_block, self.num_blocks - 1)

  def is_first(self, index_B: np.ndarray) -> np.ndarray:
    """Position 0 of its context (never, for stores without contexts)."""
    if self.context_len == 1:
      return np.zeros(len(index_B), bool)
    index_B = np.asarray(index_B, np.int64)
    s = np.searchsorted(self.offsets, index_B, side="right") - 1
    return (index_B - self.offsets[s]) % self.context_len == 0


class ReconBlocks:
  """Reconstruction sums per (first position or not, block): enough for FVU and MSE of any reweighting."""

  def __init__(self, layout: BlockLayout, d_model: int):
    self.layout = layout
    g = layout.num_blocks
    self.n_2xG = np.zeros((2, g))
    self.sq_err_2xG = np.zeros((2, g))
    self.sq_err_std_2xG = np.zeros((2, g))
    self.sum_sq_2xG = np.zeros((2, g))
    self.sum_2xGxD = np.zeros((2, g, d_model))

  def add(self, index_B, x_BxD, recon_BxD, xs_BxD, recon_std_BxD) -> None:
    x = np.asarray(x_BxD, np.float64)
    key_B = self.layout.is_first(index_B) * self.layout.num_blocks + self.layout.block_of(index_B)
    sq_B = np.square(x - np.asarray(recon_BxD, np.float64)).sum(1)
    sq_std_B = np.square(np.asarray(xs_BxD, np.float64) - np.asarray(recon_std_BxD, np.float64)).sum(1)
    norm_sq_B = np.square(x).sum(1)
    size = 2 * self.layout.num_blocks
    for arr, vals in ((self.n_2xG, np.ones(len(x))), (self.sq_err_2xG, sq_B), (self.sq_err_std_2xG, sq_std_B),
                      (self.sum_sq_2xG, norm_sq_B)):
      arr += np.bincount(key_B, vals, minlength=size).reshape(arr.shape)
    flat = self.sum_2xGxD.reshape(size, -1)
    for key in np.unique(key_B):  # a batch spans one or two blocks
      flat[key] += x[key_B == key].sum(0)

  def metrics(self, w_RxG: Optional[np.ndarray] = None, exclude_first: bool = False) -> dict:
    """FVU and standardised MSE per replicate weighting (None = the data as observed)."""
    w = np.ones((1, self.layout.num_blocks)) if w_RxG is None else np.asarray(w_RxG, np.float64)
    parts = [0] if exclude_first else [0, 1]
    tot = lambda a: sum(w @ a[p] for p in parts)
    n_R, sq_R, sq_std_R, sum_sq_R = (tot(a) for a in (self.n_2xG, self.sq_err_2xG, self.sq_err_std_2xG,
                                                       self.sum_sq_2xG))
    sum_RxD = sum(w @ self.sum_2xGxD[p] for p in parts)
    with np.errstate(divide="ignore", invalid="ignore"):
      total_var_R = sum_sq_R - np.square(sum_RxD).sum(1) / n_R
      out = {"fvu": np.where(total_var_R > 0, sq_R / total_var_R, np.nan),
             "mse": sq_std_R / (n_R * self.sum_2xGxD.shape[2]), "num_tokens": n_R}
    return out if w_RxG is not None else {k: float(v[0]) for k, v in out.items()}


class PhiBlocks(NamedTuple):
  """Per-block sufficient statistics of binary firings for φ (only pairs that ever co-occur are stored)."""
  tokens_G: np.ndarray       # float64 [G]
  n1_GxN: np.ndarray         # float64 [G, N]
  pair_i_P: np.ndarray       # int64, i < j
  pair_j_P: np.ndarray
  n11_GxP: sp.csr_matrix     # float64
  num_tokens_used: int       # tokens the φ bootstrap covers (all, unless over budget)


def phi_blocks(firings: Firings, block_T: np.ndarray, num_blocks: int, max_pair_entries: int) -> PhiBlocks:
  """Per-block N1 and N11 from a firing record; block_T[t] is token t's block."""
  f = firings.csr()
  lens_T = np.diff(firings.indptr_T1)
  cost_T = np.cumsum(lens_T * (lens_T - 1) // 2)
  # Over budget: keep whole leading blocks.
  keep_blocks = num_blocks
  if len(cost_T) and cost_T[-1] > max_pair_entries:
    keep_blocks = max(2, int(block_T[np.searchsorted(cost_T, max_pair_entries)]))
  n = firings.width
  tokens_G = np.zeros(keep_blocks)
  n1_GxN = np.zeros((keep_blocks, n))
  keys, rows, vals = [], [], []
  for g in range(keep_blocks):
    sel = np.flatnonzero(block_T == g)
    if not len(sel):
      continue
    f_g = f[sel]
    tokens_G[g] = len(sel)
    n1_GxN[g] = np.asarray(f_g.sum(0)).ravel()
    c = sp.triu(f_g.T @ f_g, k=1).tocoo()
    keys.append(c.row.astype(np.int64) * n + c.col)
    rows.append(np.full(len(c.data), g))
    vals.append(c.data.astype(np.float64))
  cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
  keys, rows, vals = cat(keys, np.int64), cat(rows, np.int64), cat(vals, np.float64)
  uniq, col = np.unique(keys, return_inverse=True)
  n11 = sp.csr_matrix((vals, (rows, col)), shape=(keep_blocks, len(uniq)))
  return PhiBlocks(tokens_G, n1_GxN, uniq // n, uniq % n, n11, int(tokens_G.sum()))


def mean_abs_phi(pb: PhiBlocks, w_RxG: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
  """Mean |φ| over all N(N−1)/2 pairs (undefined φ = 0) for each row of block weights."""
  w_RxG = np.atleast_2d(np.asarray(w_RxG, np.float64))
  n = pb.n1_GxN.shape[1]
  n11_PxG = pb.n11_GxP.T.tocsr()
  out = np.zeros(len(w_RxG))
  for r, w_G in enumerate(w_RxG):
    t = float(w_G @ pb.tokens_G)
    n1_N = w_G @ pb.n1_GxN
    live = (n1_N > 0) & (n1_N < t)
    # φ_ij = t·N11·h_i·h_j − g_i·g_j with h = 1 / sqrt(N1 (t − N1)), g = N1·h; h = g = 0 where φ is
    # undefined, so those pairs add 0.
    h_N = np.zeros(n)
    h_N[live] = 1.0 / np.sqrt(n1_N[live] * (t - n1_N[live]))
    g_N = n1_N * h_N
    total = 0.5 * (np.square(g_N.sum()) - np.square(g_N).sum())
    n11_P = n11_PxG @ w_G
    for a in range(0, len(n11_P), chunk):  # bounded temporaries for large P
      i, j = pb.pair_i_P[a:a + chunk], pb.pair_j_P[a:a + chunk]
      gg = g_N[i] * g_N[j]
      total += (np.abs(t * n11_P[a:a + chunk] * h_N[i] * h_N[j] - gg) - gg).sum()
    out[r] = total / (n * (n - 1) / 2)
  return out


def _pct(a, b):
  with np.errstate(divide="ignore", invalid="ignore"):
    return (np.asarray(a) - np.asarray(b)) / np.abs(b) * 100.0


def interval(point: float, reps_R: np.ndarray, level: float, jack_G: Optional[np.ndarray] = None) -> dict:
  """Bootstrap interval of the replicates around the point estimate: BCa with jackknife values, else percentile.

  BCa (Efron 1987) moves the percentile interval's ends by the replicates' median bias
  z0 (from the share of replicates below the point) and the acceleration a (the skewness of
  the leave-one-block-out values `jack_G`). Mean |φ| needs it: |φ| of noisy counts is biased
  upwards, and resampling adds noise, so the replicates sit off-centre of the point estimate
  and the plain percentile interval is lopsided around it. `bias` is mean(replicates) - point.
  """
  reps = np.asarray(reps_R, np.float64)
  reps = reps[np.isfinite(reps)]
  if not len(reps) or not np.isfinite(point):
    return {"estimate": point, "low": None, "high": None, "se": None, "bias": None, "method": None}
  q_lo, q_hi = 50 * (1 - level), 50 * (1 + level)
  method = "percentile"
  jack = None if jack_G is None else np.asarray(jack_G, np.float64)
  below = (np.sum(reps < point) + 0.5 * np.sum(reps == point)) / len(reps)
  if jack is not None and np.all(np.isfinite(jack)) and len(jack) > 2 and 0 < below < 1:
    z0 = special.ndtri(below)
    dev = jack.mean() - jack
    denom = 6.0 * np.sum(dev ** 2) ** 1.5
    a = float(np.sum(dev ** 3) / denom) if denom > 0 else 0.0
    ends = []
    for z in special.ndtri(np.array([(1 - level) / 2, (1 + level) / 2])):
      ends.append(100 * special.ndtr(z0 + (z0 + z) / (1 - a * (z0 + z))))
    q_lo, q_hi = ends
    method = "BCa"
  lo, hi = np.percentile(reps, [q_lo, q_hi])
  return {"estimate": float(point), "low": float(lo), "high": float(hi),
          "se": float(np.std(reps, ddof=1)) if len(reps) > 1 else None,
          "bias": float(np.mean(reps) - point), "method": method}


def jackknife_weights(observed_G: np.ndarray, num_blocks: int) -> np.ndarray:
  """Rows of block weights leaving one observed block out each (unobserved blocks weigh 0)."""
  w = np.zeros((len(observed_G), num_blocks))
  w[:, observed_G] = 1.0
  w[np.arange(len(observed_G)), observed_G] = 0.0
  return w


def block_weights(num_blocks: int, replicates: int, seed: int) -> np.ndarray:
  """Each row: how often each block is drawn when num_blocks blocks are drawn with replacement."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(num_blocks, np.full(num_blocks, 1.0 / num_blocks), size=replicates).astype(np.float64)


def compare(rec_joint: ReconBlocks, rec_solo: ReconBlocks, phi_joint: Optional[PhiBlocks],
            phi_solo: Optional[PhiBlocks], cfg: BootstrapConfig) -> dict:
  """Joint-vs-solo percent differences with bootstrap intervals (comparison.bootstrap of report.json)."""
  layout = rec_joint.layout
  observed = np.flatnonzero(rec_joint.n_2xG.sum(0) > 0)  # blocks holding evaluation tokens
  g = len(observed)
  if g < 2:
    return {"skipped": "fewer than 2 blocks of contexts"}
  w_full = np.zeros((cfg.replicates, layout.num_blocks))
  w_full[:, observed] = block_weights(g, cfg.replicates, cfg.seed)
  w_jack = jackknife_weights(observed, layout.num_blocks)
  out = {"method": ("BCa bootstrap over blocks of whole consecutive contexts, drawn with replacement, "
                    "same draw for joint and solo (acceleration from the leave-one-block-out jackknife)"),
         "replicates": cfg.replicates, "level": cfg.level, "num_blocks": g,
         "contexts_per_block": layout.contexts_per_block}
  # Both over all evaluation positions, as the headline fvu and mse are.
  for key in ("fvu", "mse"):
    pj, ps = rec_joint.metrics()[key], rec_solo.metrics()[key]
    rj, rs = rec_joint.metrics(w_full)[key], rec_solo.metrics(w_full)[key]
    jj, js = rec_joint.metrics(w_jack)[key], rec_solo.metrics(w_jack)[key]
    out[f"{key}_pct"] = interval(float(_pct(pj, ps)), _pct(rj, rs), cfg.level, _pct(jj, js))
  if phi_joint is not None and phi_solo is not None:
    gp = min(len(phi_joint.tokens_G), len(phi_solo.tokens_G))
    obs_p = observed[observed < gp]
    w_p = np.zeros((cfg.replicates, gp))
    w_p[:, obs_p] = block_weights(len(obs_p), cfg.replicates, cfg.seed + 1)
    trim = lambda pb: pb._replace(tokens_G=pb.tokens_G[:gp], n1_GxN=pb.n1_GxN[:gp], n11_GxP=pb.n11_GxP[:gp])
    pj, ps = trim(phi_joint), trim(phi_solo)
    ones = np.ones((1, gp))
    point = float(_pct(mean_abs_phi(pj, ones)[0], mean_abs_phi(ps, ones)[0]))
    w_pj = jackknife_weights(obs_p, gp)
    out["mean_abs_phi_pct"] = interval(point, _pct(mean_abs_phi(pj, w_p), mean_abs_phi(ps, w_p)), cfg.level,
                                       _pct(mean_abs_phi(pj, w_pj), mean_abs_phi(ps, w_pj)))
    out["mean_abs_phi_num_tokens"] = int(pj.tokens_G.sum())
    out["mean_abs_phi_num_blocks"] = len(obs_p)
  return out
