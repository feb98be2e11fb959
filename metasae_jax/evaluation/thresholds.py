"""Per-latent firing thresholds θ calibrated on held-out tokens (equal error rate vs BatchTopK).

Legend: B = tokens in a batch, N = latents, H = histogram bins (+2: underflow, overflow).
BatchTopK depends on the batch; θ_i makes latent i fire batch-independently (pre > θ_i). For each
latent, "selected" = kept by BatchTopK over its batch, "rejected" = positive but not kept. θ_i is the
histogram edge where the fraction of selected values below θ (misses) equals the fraction of
rejected values above θ (false alarms). Latents with fewer than `min_selections` selections (or no
rejected values) use the reference's rule on the same grid (docs/method.md §2.6): θ = max(centre of the first
bin holding a selected value, centre of the last bin holding only rejected values), which keeps
rare latents from false firings; latents never selected are dead: θ = +inf.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metasae_jax.core import architectures
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage import heldout, loaded_sae
from metasae_jax.storage.loaded_sae import LoadedSAE
from metasae_jax.storage.store import Store


FALLBACK_RULE = ("reference histogram rule for latents with < min_selections selections or no rejected "
                 "values: max(centre of the first bin with a selected value, centre of the last bin with "
                 "only rejected values); underflow bin centre = edges[0] / 2, overflow = edges[-1]")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """How θ is calibrated."""
  num_tokens: int = 0
  """Held-out tokens used, after skipping (0 = the whole store)."""
  batch_size: int = TrainConfig.batch_size
  """Tokens per BatchTopK batch: the training batch size, so selection matches training (default: TrainConfig's;
  `evaluate` passes the run's)."""
  skip_first_positions: int = 0
  """Positions t % context_len < this are skipped (attention sinks; docs/method.md §3.2)."""
  bins: int = 256
  """Log-spaced histogram bins between `span`-fold below and above the first batch's threshold."""
  span: float = 1.5
  """The EER θ lies between the smallest and largest batch threshold (below, misses are 0 and false
  alarms only grow; above, false alarms are 0), which stay within a few % of each other for
  batches of thousands of tokens; the record reports their range so a too narrow grid shows."""
  min_selections: int = 100
  """Latents selected fewer times use the reference's histogram rule instead of the EER (docs/method.md §2.6)."""

  def __post_init__(self):
    if self.bins < 2 or self.span <= 1 or self.min_selections < 1:
      raise ValueError("CalibrationConfig needs bins >= 2, span > 1, min_selections >= 1")


class Histograms(NamedTuple):
  """Per-latent counts: histograms over bins [underflow, H bins, overflow] and exact totals."""
  edges_H1: np.ndarray      # H + 1 log-spaced edges
  sel_NxH2: np.ndarray
  rej_NxH2: np.ndarray
  num_sel_N: np.ndarray
  num_rej_N: np.ndarray
  min_sel_N: np.ndarray     # smallest selected pre-activation (+inf if none)
  batch_threshold_range: tuple = (float("nan"), float("nan"))


@functools.partial(jax.jit, static_argnames=("k", "input_norm"))
def _select(params, x_BxD, k, input_norm):
  enc = loaded_sae.encode_traced(params, x_BxD, None, k=k, firing="batchtopk", input_norm=input_norm)
  pre_BxN, sel_BxN = enc.pre_BxN, enc.acts_BxN > 0
  rej_BxN = (pre_BxN > 0) & ~sel_BxN
  min_sel_N = jnp.min(jnp.where(sel_BxN, pre_BxN, jnp.inf), axis=0)
  return pre_BxN, sel_BxN, sel_BxN.sum(0), rej_BxN.sum(0), min_sel_N


def grid(first: float, cfg: CalibrationConfig) -> np.ndarray:
  """Log-spaced edges around the first batch's threshold, shifted half a bin so it is no edge."""
  half_bin = cfg.span ** (1.0 / cfg.bins)
  return np.geomspace(first / cfg.span, first * cfg.span, cfg.bins + 1) * half_bin


def bin_index(values: np.ndarray, edges_H1: np.ndarray) -> np.ndarray:
  """0 = below edges[0], 1..H = inside, H + 1 = at or above edges[-1]."""
  # Exact comparisons (not floor(log)): a value's bin agrees with "value < edge" tests.
  return np.searchsorted(edges_H1, values, side="right").astype(np.int64)


def accumulate(pre_batches, k: int, cfg: CalibrationConfig, progress: bool = False) -> Histograms:
  """Histograms selected / rejected pre-activations over an iterable of (pre_BxN, sel_BxN, ...) batches."""
  hist = None
  for pre_BxN, sel_BxN, nsel_N, nrej_N, min_sel_N in tqdm(pre_batches, desc="thresholds", disable=not progress):
    pre_BxN, sel_BxN = np.asarray(pre_BxN), np.asarray(sel_BxN)
    n = pre_BxN.shape[1]
    if hist is None:
      first = float(np.min(pre_BxN[sel_BxN])) if sel_BxN.any() else 1.0
      edges = grid(first, cfg)
      h2 = cfg.bins + 2
      hist = dict(sel=np.zeros(n * h2, np.int64), rej=np.zeros(n * h2, np.int64),
                  nsel=np.zeros(n, np.int64), nrej=np.zeros(n, np.int64), mins=np.full(n, np.inf, np.float32),
                  batch_thresholds=[])
    if sel_BxN.any():
      hist["batch_thresholds"].append(float(np.min(np.asarray(min_sel_N))))
    # Rejected values below edges[0] only matter through their total, so skip them here.
    where = np.flatnonzero(pre_BxN >= edges[0])
    vals = pre_BxN.reshape(-1)[where]
    flat = (where % n) * h2 + bin_index(vals, edges)
    is_sel = sel_BxN.reshape(-1)[where]
    hist["sel"] += np.bincount(flat[is_sel], minlength=n * h2)
    hist["rej"] += np.bincount(flat[~is_sel], minlength=n * h2)
    hist["nsel"] += np.asarray(nsel_N)
    hist["nrej"] += np.asarray(nrej_N)
    hist["mins"] = np.minimum(hist["mins"], np.asarray(min_sel_N))
  if hist is None:
    raise ValueError("no tokens to calibrate thresholds on")
  sel = hist["sel"].reshape(n, h2)
  rej = hist["rej"].reshape(n, h2)
  # Selected values all lie at or above the batch threshold; put any below edges[0] in underflow
  # from the totals, and the rejected ones skipped above likewise.
  sel[:, 0] += hist["nsel"] - sel.sum(1)
  rej[:, 0] += hist["nrej"] - rej.sum(1)
  bt = hist["batch_thresholds"] or [float("nan")]
  return Histograms(edges, sel, rej, hist["nsel"], hist["nrej"], hist["mins"], (min(bt), max(bt)))


def bin_centres(edges_H1: np.ndarray) -> np.ndarray:
  """Representative value of each of the H + 2 bins [underflow, H bins, overflow] (float64)."""
  # Log-spaced bins: the geometric centre. Pre-activations are positive, so underflow is
  # [0, edges[0]) with centre edges[0] / 2; overflow is unbounded, so it takes its lower edge.
  edges = np.asarray(edges_H1, np.float64)
  return np.concatenate([[edges[0] / 2], np.sqrt(edges[:-1] * edges[1:]), [edges[-1]]])


def fallback_thresholds(h: Histograms) -> np.ndarray:
  """The reference's rule for rarely selected latents: max(first selected bin, last rejected-only bin) centre."""
  centres_H2 = bin_centres(h.edges_H1)
  has_sel = h.sel_NxH2 > 0
  only_rej = (h.rej_NxH2 > 0) & ~has_sel
  h2 = h.sel_NxH2.shape[1]
  first_sel_N = np.where(has_sel.any(1), np.argmax(has_sel, axis=1), h2 - 1)
  last_rej_N = np.where(only_rej.any(1), h2 - 1 - np.argmax(only_rej[:, ::-1], axis=1), 0)
  theta_N = np.maximum(centres_H2[first_sel_N], np.where(only_rej.any(1), centres_H2[last_rej_N], -np.inf))
  return theta_N.astype(np.float32)


def eer_thresholds(h: Histograms, min_selections: int) -> tuple[np.ndarray, dict]:
  """θ per latent from the histograms, and counts of each rule applied."""
  n = h.sel_NxH2.shape[0]
  # Candidate θ = edges[j]: misses = selected in bins 0..j (values < edges[j]); false alarms =
  # rejected in bins j+1.. (values >= edges[j]).
  cum_sel = np.cumsum(h.sel_NxH2, axis=1)[:, :-1]           # [N, H + 1]
  cum_rej = np.cumsum(h.rej_NxH2, axis=1)[:, :-1]
  fnr = cum_sel / np.maximum(h.num_sel_N, 1)[:, None]
  fpr = (h.num_rej_N[:, None] - cum_rej) / np.maximum(h.num_rej_N, 1)[:, None]
  j = np.argmin(np.abs(fnr - fpr), axis=1)
  theta = h.edges_H1[j].astype(np.float32)
  dead = h.num_sel_N == 0
  few = ~dead & ((h.num_sel_N < min_selections) | (h.num_rej_N == 0))
  theta = np.where(few, fallback_thresholds(h), theta)
  theta = np.where(dead, np.float32(np.inf), theta).astype(np.float32)
  return theta, {"num_latents": int(n), "num_dead": int(dead.sum()), "num_fallback": int(few.sum()),
                 "num_eer": int(n - dead.sum() - few.sum())}


def calibrate(sae: LoadedSAE, store: Store, cfg: CalibrationConfig, progress: bool = True) -> tuple[np.ndarray, dict]:
  """θ for every latent of `sae` from held-out store tokens, plus the cfg.json record of how."""
  if architectures.spec(sae.cfg["activation"]).learned_threshold:
    raise UserError(f"SAE {sae.path} is a {sae.cfg['activation']} SAE: its thresholds were trained with it and "
                    "are its firing rule; calibrating would replace them. Evaluate it with the default firing.")
  num = heldout.resolve_num_tokens(store, cfg.num_tokens, cfg.skip_first_positions)
  batches = (_select(sae.device_params, jnp.asarray(b.acts_BxD), sae.k, sae.input_norm)
             for b in heldout.iter_batches(store, cfg.batch_size, num, cfg.skip_first_positions))
  hist = accumulate(batches, sae.k, cfg, progress)
  theta, counts = eer_thresholds(hist, cfg.min_selections)
  record = {"method": "equal_error_rate_histogram", "store": store.path, "num_tokens": num,
            "batch_size": cfg.batch_size, "k": sae.k, "bins": cfg.bins,
            "bin_range": [float(hist.edges_H1[0]), float(hist.edges_H1[-1])],
            "batch_threshold_range": list(hist.batch_threshold_range),
            "grid_covers_batch_thresholds": bool(hist.edges_H1[0] <= hist.batch_threshold_range[0]
                                                 and hist.batch_threshold_range[1] <= hist.edges_H1[-1]),
            "min_selections": cfg.min_selections, "fallback": FALLBACK_RULE,
            "dead": "+inf", "firing_rule": "pre > threshold",
            **heldout.skip_rule(store.context_len, cfg.skip_first_positions), **counts}
  return theta, record


def write_into_artifact(sae: LoadedSAE, theta_N: np.ndarray, record: dict) -> LoadedSAE:
  """Stores θ in the artifact (sae.safetensors `threshold`, cfg has_threshold + threshold_calibration)."""
  from metasae_jax.storage import artifact  # local: keeps this module importable without safetensors
  cfg = dict(sae.cfg, threshold_calibration=record)
  artifact.save_sae(sae.path, sae.params, cfg, threshold_N=theta_N)
  return sae.with_threshold(theta_N, dict(cfg, has_threshold=True))
