"""Reconstruction metrics streamed over held-out tokens: FVU, MSE on standardised inputs, L0, dead fraction.

Legend: B = tokens in a batch, D = d_model, N = latents.
FVU = Σ ||x − x̂||² / Σ ||x − mean(x)||², the mean taken over the whole evaluation set per feature
(docs/method.md §2.1); sums in float64 so a million tokens do not lose precision.
Besides position 0, LMs park a few other tokens (first newline, first period) as
attention sinks with ~150x the usual norm; a handful of them can carry most of
the variance and make FVU measure only them. `fvu_typical` is the same ratio over
tokens with norm <= OUTLIER_FACTOR x the median norm (of the first batch), and
`outlier_tokens` counts the rest. `fvu_outliers` is the part of `fvu` those outliers make (their squared
error over the same all-token denominator) and `outlier_variance_share` the part of the raw variance they
hold: on SmolLM2 layer 15 a handful of position-1 sinks hold ~80 % of it (docs/method.md §4).
"""

from typing import Optional

import numpy as np
from tqdm import tqdm

from metasae_jax.core.config import TrainConfig
from metasae_jax.storage import heldout, loaded_sae
from metasae_jax.storage.store import Store

OUTLIER_FACTOR = 10.0


class Accumulator:
  """Running sums for one SAE; feed it batches, read `result()`."""

  def __init__(self, d_model: int, width: int):
    self.num_tokens = 0
    self.sq_err = 0.0
    self.sum_D = np.zeros(d_model, np.float64)
    self.sum_sq_D = np.zeros(d_model, np.float64)
    self.sq_err_std = 0.0
    self.num_active = 0
    self.fired_N = np.zeros(width, bool)
    self.ref_norm = None
    self.typical = {"n": 0, "sq_err": 0.0, "sum_D": np.zeros(d_model, np.float64),
                    "sum_sq_D": np.zeros(d_model, np.float64)}
    self.outliers = {"sq_err": 0.0, "sum_D": np.zeros(d_model, np.float64), "sum_sq": 0.0}

  def add(self, x_BxD, recon_BxD, xs_BxD, recon_std_BxD, acts_BxN) -> None:
    x = np.asarray(x_BxD, np.float64)
    err_B = np.square(x - np.asarray(recon_BxD, np.float64)).sum(1)
    self.num_tokens += x.shape[0]
    self.sq_err += float(err_B.sum())
    self.sum_D += x.sum(0)
    self.sum_sq_D += np.square(x).sum(0)
    self.sq_err_std += float(np.square(np.asarray(xs_BxD, np.float64) - np.asarray(recon_std_BxD, np.float64)).sum())
    active = np.asarray(acts_BxN) != 0
    self.num_active += int(active.sum())
    self.fired_N |= active.any(0)
    norm_B = np.linalg.norm(x, axis=1)
    if self.ref_norm is None:
      self.ref_norm = float(np.median(norm_B))
    keep = norm_B <= OUTLIER_FACTOR * self.ref_norm
    xt = x[keep]
    typ = self.typical
    typ["n"] += int(keep.sum())
    typ["sq_err"] += float(err_B[keep].sum())
    out = self.outliers
    out["sq_err"] += float(err_B[~keep].sum())
    out["sum_D"] += x[~keep].sum(0)
    out["sum_sq"] += float(np.square(x[~keep]).sum())
    typ["sum_D"] += xt.sum(0)
    typ["sum_sq_D"] += np.square(xt).sum(0)

  def result(self) -> dict:
    t = max(self.num_tokens, 1)
    total_var = float((self.sum_sq_D - np.square(self.sum_D) / t).sum())
    typ = self.typical
    typ_var = float((typ["sum_sq_D"] - np.square(typ["sum_D"]) / max(typ["n"], 1)).sum())
    out, n_out = self.outliers, self.num_tokens - typ["n"]
    mean_D = self.sum_D / t
    # The outliers' squared distance to the all-token mean: their part of the FVU denominator.
    out_var = out["sum_sq"] - 2.0 * float(mean_D @ out["sum_D"]) + n_out * float(mean_D @ mean_D)
    share = lambda v: v / total_var if total_var > 0 else float("nan")
    return {"fvu": share(self.sq_err),
            "fvu_typical": typ["sq_err"] / typ_var if typ_var > 0 else float("nan"),
            "outlier_tokens": n_out,
            "fvu_outliers": share(out["sq_err"]),
            "outlier_variance_share": share(out_var),
            "mse": self.sq_err_std / (t * len(self.sum_D)),
            "l0": self.num_active / t,
            "dead_fraction": float(1.0 - self.fired_N.mean()),
            "num_tokens": self.num_tokens}


def evaluate(sae: loaded_sae.LoadedSAE, store: Store, num_tokens: int = 0, batch_size: int = TrainConfig.batch_size,
             skip_first_positions: int = 1, firing: Optional[str] = None, progress: bool = True) -> dict:
  """Reconstruction metrics of one SAE on a store under `firing` (None = the SAE's default), which it records.

  The evaluation binary fuses this into its one pass over the store.
  """
  firing = sae.firing_rule(firing)
  num = heldout.resolve_num_tokens(store, num_tokens, skip_first_positions)
  acc = Accumulator(sae.d_model, sae.width)
  for batch in tqdm(heldout.iter_batches(store, batch_size, num, skip_first_positions),
                    total=-(-num // batch_size), desc="reconstruction", disable=not progress):
    out = sae.forward(batch.acts_BxD, firing)
    acc.add(batch.acts_BxD, out.recon_BxD, out.xs_BxD, out.recon_std_BxD, out.acts_BxN)
  return dict(acc.result(), firing=firing, **heldout.skip_rule(store.context_len, skip_first_positions))
