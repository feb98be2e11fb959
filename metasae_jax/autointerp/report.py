"""Summaries of the per-latent scores: means per SAE, the paired joint-vs-solo comparison, and explanations.md."""

import math
from typing import Optional, Sequence

import numpy as np
import scipy.stats

from metasae_jax.storage.artifact import SAE_NAMES

METRICS = ("fuzz_spearman", "fuzz_balanced_accuracy")


def _finite(x) -> Optional[float]:
  return float(x) if x is not None and math.isfinite(float(x)) else None


def sae_summary(latents: Sequence[dict]) -> dict:
  """Mean of each metric over the SAE's scored latents, plus the latents themselves."""
  out = {}
  for m in METRICS:
    vals = [lat[m] for lat in latents]
    out[m] = _finite(np.mean(vals)) if vals else None
  out["num_latents"] = len(latents)
  out["latents"] = list(latents)
  return out


def paired(joint: Sequence[dict], solo: Sequence[dict]) -> dict:
  """Per metric over matched pairs: mean(joint - solo), paired t-test (scipy), fraction where joint is higher."""
  out = {"num_pairs": len(joint)}
  for m in METRICS:
    a = np.asarray([lat[m] for lat in joint], np.float64)
    b = np.asarray([lat[m] for lat in solo], np.float64)
    entry = {"mean_difference": _finite(np.mean(a - b)) if len(a) else None, "t": None, "p": None,
             "joint_win_fraction": _finite(np.mean(a > b)) if len(a) else None,
             "tie_fraction": _finite(np.mean(a == b)) if len(a) else None}
    if len(a) >= 2 and np.ptp(a - b) > 0:
      test = scipy.stats.ttest_rel(a, b)
      entry["t"], entry["p"] = _finite(test.statistic), _finite(test.pvalue)
    out[m] = entry
  return out


def explanations_markdown(scores: dict) -> str:
  """A human-readable page: one section per matched pair with both explanations and scores."""
  lines = ["# Autointerp explanations", "",
           f"LLM: `{scores['llm']}`; {scores['num_tokens']} tokens; pairs: {scores['paired']['num_pairs']}.",
           "", "| SAE | mean fuzz ρ | mean balanced acc. |", "|---|---|---|"]
  for name in SAE_NAMES:
    s = scores[name]
    lines.append(f"| {name} | {_fmt(s['fuzz_spearman'])} | {_fmt(s['fuzz_balanced_accuracy'])} |")
  lines.append("")
  for i, (j, s) in enumerate(zip(scores["joint"]["latents"], scores["solo"]["latents"]), 1):
    lines.append(f"## Pair {i}: joint {j['id']} / solo {s['id']} (decoder cosine {_fmt(j['pair_cosine'])})")
    lines.append("")
    for name, lat in (("joint", j), ("solo", s)):
      lines.append(f"- **{name} {lat['id']}** — {lat['explanation']}  ")
      lines.append(f"  fuzz ρ {_fmt(lat['fuzz_spearman'])}, balanced acc. "
                   f"{_fmt(lat['fuzz_balanced_accuracy'])}, fired {lat['num_fired']}×, "
                   f"failed answers {lat['failed_answers']}")
    lines.append("")
  return "\n".join(lines)


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"
