"""The matryoshka arm of a comparison: a solo Matryoshka BatchTopK SAE beside the joint MetaSAE and solo BatchTopK.

Same width, k, seed and shared hyperparameters as the solo SAE it is compared with; no meta SAE penalty
(λ₂ = 0) and no lockstep twin. JAX-free: the ground-truth study and the reproduce pipeline both build it here.
"""

ARCHITECTURE = "matryoshka_batchtopk"
DEFAULT_FRACTIONS = (0.125, 0.25, 0.5)
"""Nested prefixes at width/8, width/4, width/2 (and the full width): a few prefixes of growing size, as
Bussmann et al. 2025 nest theirs."""


def prefix_widths(width: int, fractions) -> tuple:
  """The prefix widths, rounded to whole latents, below the full width (TrainConfig appends the full width)."""
  return tuple(sorted({w for w in (max(1, round(f * width)) for f in fractions) if w < width}))


def check_fractions(fractions) -> str:
  """'' when the fractions are strictly increasing in (0, 1), else what is wrong."""
  fr = [float(f) for f in fractions]
  if all(0 < f < 1 for f in fr) and fr == sorted(set(fr)):
    return ""
  return f"matryoshka_fractions must be strictly increasing in (0, 1), got {fr}"


def train_fields(train: dict, fractions, seed: int) -> dict:
  """TrainConfig keyword arguments of the arm from the shared ones (`train`, without d_model)."""
  return dict(train, lambda2=0.0, seed=seed, baseline=False, architecture=ARCHITECTURE,
              matryoshka_widths=prefix_widths(train["width"], fractions))
