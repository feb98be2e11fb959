"""Reading scorer answers (logprobs first, text as fallback) and the two scores: fuzz Spearman ρ and balanced accuracy."""

import math
from typing import Optional, Sequence

import numpy as np
import scipy.stats

from metasae_jax.autointerp import prompts
from metasae_jax.autointerp.backends import Completion


def _choice_probs(completion: Completion, choices: Sequence[str]) -> Optional[dict]:
  """Probability mass on each choice from the first answer token; None if the backend gave none of them."""
  if completion.choice_logprobs:
    probs = {c: math.exp(lp) for c, lp in completion.choice_logprobs.items() if c in choices}
  else:
    probs = {}
    for token, lp in completion.top_logprobs.items():
      key = token.strip().lower()
      for c in choices:
        if key == c.lower():
          probs[c] = probs.get(c, 0.0) + math.exp(lp)
  if not probs or sum(probs.values()) <= 0:
    return None
  return probs


def read_strength(completion: Completion) -> Optional[float]:
  """Expected value over the tokens "0".."10" (renormalised), else the number in the text, else None."""
  probs = _choice_probs(completion, prompts.STRENGTHS)
  if probs is not None:
    total = sum(probs.values())
    return sum(int(c) * p for c, p in probs.items()) / total
  parsed = prompts.parse_strength(completion.text)
  return None if parsed is None else float(parsed)


def read_yes(completion: Completion) -> Optional[float]:
  """P("yes") / (P("yes") + P("no")) from logprobs, else 1/0 from the text, else None."""
  probs = _choice_probs(completion, prompts.YES_NO)
  if probs is not None:
    return probs.get("yes", 0.0) / sum(probs.values())
  parsed = prompts.parse_yes_no(completion.text)
  return None if parsed is None else float(parsed)


def fuzz_spearman(predicted: Sequence[Optional[float]], actual: Sequence[float]) -> tuple[float, bool]:
  """Spearman ρ(predicted, actual) in [-1, 1] and whether it was defined.

  A failed answer (None) counts against the latent: it gets the prediction
  furthest from its truth (0 for an example at or above the median actual, else
  10). Constant predictions or actuals carry no rank information: ρ = 0 (chance).
  """
  actual_E = np.asarray(actual, np.float64)
  median = float(np.median(actual_E)) if len(actual_E) else 0.0
  pred_E = np.array([(0.0 if a >= median else 10.0) if p is None else float(p)
                     for p, a in zip(predicted, actual_E)], np.float64)
  if len(pred_E) < 2 or np.ptp(pred_E) == 0 or np.ptp(actual_E) == 0:
    return 0.0, False
  rho = scipy.stats.spearmanr(pred_E, actual_E).statistic
  if not np.isfinite(rho):
    return 0.0, False
  return float(rho), True


def balanced_accuracy(p_yes: Sequence[Optional[float]], labels: Sequence[bool]) -> float:
  """Mean of the true-positive and true-negative rates at P(yes) > 0.5; a failed answer (None) is wrong."""
  rates = []
  for cls in (True, False):
    idx = [i for i, y in enumerate(labels) if bool(y) == cls]
    if not idx:
      continue
    correct = sum(1 for i in idx if p_yes[i] is not None and (p_yes[i] > 0.5) == cls)
    rates.append(correct / len(idx))
  return float(np.mean(rates)) if rates else 0.0
