"""Activating and non-activating example contexts per latent, streamed from a token store through the SAEs.

Legend: B = tokens in a batch, C = tracked (candidate) latents, K = top tokens
kept per latent, R = reservoir size, P = pool entries, W = window tokens.
Memory stays bounded: per tracked latent only its K top tokens and an R-token
uniform reservoir of firing tokens are kept, merged after every batch; no
tokens x latents matrix is ever held.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from metasae_jax.evaluation.encoder import NOT_FIRING_KEY, StreamEncoder
from metasae_jax.storage.positions import KeptTokens
from metasae_jax.storage.store_types import Store


@dataclasses.dataclass(frozen=True)
class Example:
  """One context window ending at its example token (the last one)."""
  token_ids: tuple
  """Token ids of the window, oldest first."""
  acts: tuple
  """The latent's activation on every window token (0 where it does not fire or the position is skipped)."""
  end: int
  """Global store index of the window's last token."""

  @property
  def activation(self) -> float:
    return float(self.acts[-1])


@dataclasses.dataclass
class Pools:
  """Streaming state for one SAE: counts of all latents, bounded candidates of the tracked ones."""
  cand_C: np.ndarray
  count_N: np.ndarray
  top_val_CxK: np.ndarray
  top_rank_CxK: np.ndarray
  res_key_CxR: np.ndarray
  res_val_CxR: np.ndarray
  res_rank_CxR: np.ndarray
  batch_size: int = 0
  """Tokens per encoding batch; kept rank r was encoded in batch r // batch_size."""
  batch_thresholds: list = dataclasses.field(default_factory=list)
  """BatchTopK threshold of every batch (NaN under other rules), to recompute window activations."""
  rule: str = ""
  """The firing rule the SAE was encoded with ("threshold", "topk" or "batchtopk")."""

  @classmethod
  def empty(cls, cand_C: np.ndarray, width: int, top: int, reservoir: int) -> "Pools":
    c = len(cand_C)
    return cls(np.asarray(cand_C, np.int64), np.zeros(width, np.int64),
               np.zeros((c, top), np.float32), np.full((c, top), -1, np.int64),
               np.full((c, reservoir), NOT_FIRING_KEY, np.float32), np.zeros((c, reservoir), np.float32),
               np.full((c, reservoir), -1, np.int64))

  def merge(self, stats, ranks_B: np.ndarray) -> None:
    """Folds one batch's candidates in, keeping the K largest values and the R smallest keys."""
    self.count_N += np.asarray(stats.count_N)
    self.batch_thresholds.append(float(stats.threshold))
    k, r = self.top_val_CxK.shape[1], self.res_key_CxR.shape[1]
    val = np.concatenate([self.top_val_CxK, np.asarray(stats.top_val_CxK)], axis=1)
    rank = np.concatenate([self.top_rank_CxK, ranks_B[np.asarray(stats.top_pos_CxK)]], axis=1)
    keep = np.argsort(-val, axis=1, kind="stable")[:, :k]
    self.top_val_CxK = np.take_along_axis(val, keep, 1)
    self.top_rank_CxK = np.take_along_axis(rank, keep, 1)
    key = np.concatenate([self.res_key_CxR, np.asarray(stats.res_key_CxR)], axis=1)
    rval = np.concatenate([self.res_val_CxR, np.asarray(stats.res_val_CxR)], axis=1)
    rrank = np.concatenate([self.res_rank_CxR, ranks_B[np.asarray(stats.res_pos_CxR)]], axis=1)
    keep = np.argsort(key, axis=1, kind="stable")[:, :r]
    self.res_key_CxR = np.take_along_axis(key, keep, 1)
    self.res_val_CxR = np.take_along_axis(rval, keep, 1)
    self.res_rank_CxR = np.take_along_axis(rrank, keep, 1)

  def pool(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct firing tokens (kept ranks, activations) known for candidate c, strongest first."""
    top = self.top_val_CxK[c] > 0
    res = self.res_key_CxR[c] < 1.0
    rank_P = np.concatenate([self.top_rank_CxK[c][top], self.res_rank_CxR[c][res]])
    val_P = np.concatenate([self.top_val_CxK[c][top], self.res_val_CxR[c][res]])
    rank_P, first = np.unique(rank_P, return_index=True)
    val_P = val_P[first]
    order = np.argsort(-val_P, kind="stable")
    return rank_P[order], val_P[order]


def stream(store: Store, kept: KeptTokens, encoders: Sequence[StreamEncoder],
           cands: Sequence[np.ndarray], num_kept: int, batch_size: int, top: int, reservoir: int,
           seed: int, on_batch: Optional[Callable[[int], None]] = None) -> list:
  """Encodes the first `num_kept` kept tokens in consecutive batches with every SAE; returns their Pools."""
  pools = [Pools.empty(c, e.width, top, reservoir) for e, c in zip(encoders, cands)]
  for p, e in zip(pools, encoders):
    p.batch_size, p.rule = batch_size, e.rule
  base = jax.random.key(seed)
  for b, start in enumerate(range(0, num_kept, batch_size)):
    ranks_B = np.arange(start, min(start + batch_size, num_kept), dtype=np.int64)
    x_BxD = store.gather_acts(kept.kept_to_global(ranks_B))
    for i, (enc, p) in enumerate(zip(encoders, pools)):
      rng = jax.random.fold_in(jax.random.fold_in(base, i), b)
      p.merge(enc.batch_stats(x_BxD, p.cand_C, rng, top, reservoir), ranks_B)
    if on_batch is not None:
      on_batch(len(ranks_B))
  return pools


def sample_top_heavy(num_P: int, n: int, quantiles: int, rng: np.random.Generator,
                     exclude: Sequence[int] = ()) -> list:
  """Picks n distinct pool positions (pool sorted strongest first) spread over rank quantile bins.

  Bin q (0 = strongest) gets weight quantiles - q; bins short of examples pass
  their share on to the others.
  """
  available = np.setdiff1d(np.arange(num_P), np.asarray(exclude, np.int64))
  n = min(n, len(available))
  bins = [b for b in np.array_split(available, quantiles) if len(b)]
  bins = [list(rng.permutation(b)) for b in bins]
  weights = np.arange(len(bins), 0, -1, dtype=np.float64)
  chosen: list = []
  while len(chosen) < n:
    live = [i for i, b in enumerate(bins) if b]
    w = weights[live] / weights[live].sum()
    quota = np.maximum(1, np.floor(w * (n - len(chosen))).astype(int))
    for i, q in zip(live, quota):
      take = bins[i][:q][: n - len(chosen)]
      bins[i] = bins[i][len(take):]
      chosen.extend(int(t) for t in take)
      if len(chosen) >= n:
        break
  return sorted(chosen)


def window_ends_to_tokens(kept: KeptTokens, ends_E: np.ndarray, window: int) -> list:
  """Global token indices of each window: up to `window` tokens ending at the end, within its context."""
  starts_E = np.maximum(kept.context_start(ends_E), ends_E - window + 1)
  return [np.arange(s, e + 1, dtype=np.int64) for s, e in zip(starts_E, ends_E)]


def window_examples(store: Store, kept: KeptTokens, enc: StreamEncoder, pools: Pools,
                    cols: np.ndarray, ends: list, window: int, chunk: int = 1024) -> list:
  """For each latent column j and its window ends, the Examples with that latent's per-token activations."""
  if pools.rule and pools.rule != enc.rule:
    raise ValueError(f"pools were streamed with firing {pools.rule!r}, windows asked for {enc.rule!r}")
  flat_ends = np.concatenate([np.asarray(e, np.int64) for e in ends]) if ends else np.zeros(0, np.int64)
  windows = window_ends_to_tokens(kept, flat_ends, window)
  if not windows:
    return [[] for _ in ends]
  uniq_T = np.unique(np.concatenate(windows))
  rank_T = kept.global_to_kept(uniq_T)
  acts_TxC = np.zeros((len(uniq_T), len(cols)), np.float32)
  kept = np.nonzero(rank_T >= 0)[0]
  thresholds = np.asarray(pools.batch_thresholds, np.float32)
  for s in range(0, len(kept), chunk):
    sel = kept[s:s + chunk]
    x = store.gather_acts(uniq_T[sel])
    thr = thresholds[np.minimum(rank_T[sel] // pools.batch_size, len(thresholds) - 1)]
    acts_TxC[sel] = enc.window_acts(x, thr, np.asarray(cols, np.int64))
  tokens_T = store.gather_tokens(uniq_T)
  out, w = [], 0
  for j, e in enumerate(ends):
    exs = []
    for _ in e:
      pos = np.searchsorted(uniq_T, windows[w])
      exs.append(Example(tuple(int(t) for t in tokens_T[pos]), tuple(float(a) for a in acts_TxC[pos, j]),
                         int(windows[w][-1])))
      w += 1
    out.append(exs)
  return out

