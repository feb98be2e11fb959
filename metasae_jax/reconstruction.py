"""Reconstruction metrics streamed over held-out tokens: FVU, MSE on standardised inputs, L0, dead fraction.

Legend: B = tokens in a batch, D = d_model, N = latents.
FVU = Σ ||x − x̂||² / Σ ||x − mean(x)||², the mean taken over the whole evaluation set per feature
(DESIGN §2); sums in float64 so a million tokens do not lose precision.
"""

import numpy as np
from tqdm import tqdm

from metasae_jax import heldout, loaded_sae
from metasae_jax.store import Store


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

  def add(self, x_BxD, recon_BxD, xs_BxD, recon_std_BxD, acts_BxN) -> None:
    x = np.asarray(x_BxD, np.float64)
    self.num_tokens += x.shape[0]
    self.sq_err += float(np.square(x - np.asarray(recon_BxD, np.float64)).sum())
    self.sum_D += x.sum(0)
    self.sum_sq_D += np.square(x).sum(0)
    self.sq_err_std += float(np.square(np.asarray(xs_BxD, np.float64) - np.asarray(recon_std_BxD, np.float64)).sum())
    active = np.asarray(acts_BxN) != 0
    self.num_active += int(active.sum())
    self.fired_N |= active.any(0)

  def result(self) -> dict:
    t = max(self.num_tokens, 1)
    total_var = float((self.sum_sq_D - np.square(self.sum_D) / t).sum())
    return {"fvu": self.sq_err / total_var if total_var > 0 else float("nan"),
            "mse": self.sq_err_std / (t * len(self.sum_D)),
            "l0": self.num_active / t,
            "dead_fraction": float(1.0 - self.fired_N.mean()),
            "num_tokens": self.num_tokens}


def evaluate(sae: loaded_sae.LoadedSAE, store: Store, num_tokens: int = 0, batch_size: int = 4096,
             skip_first_positions: int = 1, firing: str = "threshold", progress: bool = True) -> dict:
  """Reconstruction metrics of one SAE on a store (the evaluation binary fuses this into one pass)."""
  num = heldout.resolve_num_tokens(store, num_tokens, skip_first_positions)
  acc = Accumulator(sae.d_model, sae.width)
  for batch in tqdm(heldout.iter_batches(store, batch_size, num, skip_first_positions),
                    total=-(-num // batch_size), desc="reconstruction", disable=not progress):
    out = loaded_sae.forward(sae, batch.acts_BxD, firing)
    acc.add(batch.acts_BxD, out.recon_BxD, out.xs_BxD, out.recon_std_BxD, out.acts_BxN)
  return dict(acc.result(), **heldout.skip_rule(store.context_len, skip_first_positions))
