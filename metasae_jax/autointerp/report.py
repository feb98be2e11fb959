"""Summaries of the per-latent scores: means per SAE, the paired joint-vs-solo statistics, report.md and explanations.md.

Legend: L = scored latents (or pairs), B = bootstrap resamples.
"""

import math
import os
from typing import Optional, Sequence

import numpy as np
import scipy.stats

from metasae_jax.storage import atomic, markdown
from metasae_jax.storage.artifact import SAE_NAMES

METRICS = ("fuzz_spearman", "fuzz_balanced_accuracy", "detection_balanced_accuracy")
LABELS = {"fuzz_spearman": "fuzzing, strength (paper): Spearman ρ",
          "fuzz_balanced_accuracy": "fuzzing (delphi): balanced accuracy",
          "detection_balanced_accuracy": "detection (delphi): balanced accuracy"}
BOOTSTRAP_RESAMPLES = 10000
CONFIDENCE = 0.95
HISTOGRAM = "paired_differences.png"


def _finite(x) -> Optional[float]:
  return float(x) if x is not None and math.isfinite(float(x)) else None


def bootstrap_mean_ci(x_L: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                      confidence: float = CONFIDENCE) -> tuple:
  """Percentile bootstrap interval of the mean: resample the L values with replacement, take quantiles."""
  x_L = np.asarray(x_L, np.float64)
  if len(x_L) == 0:
    return None, None
  if len(x_L) == 1:
    return float(x_L[0]), float(x_L[0])
  rng = np.random.default_rng(seed)
  means_B = np.empty(resamples)
  for s in range(0, resamples, 1000):  # in chunks: a 10000 x L index matrix can be large
    idx = rng.integers(0, len(x_L), size=(min(1000, resamples - s), len(x_L)))
    means_B[s:s + len(idx)] = x_L[idx].mean(axis=1)
  alpha = (1 - confidence) / 2
  lo, hi = np.quantile(means_B, [alpha, 1 - alpha])
  return float(lo), float(hi)


def _mean_ci(x_L, seed: int) -> dict:
  lo, hi = bootstrap_mean_ci(x_L, seed)
  return {"mean": _finite(np.mean(x_L)) if len(x_L) else None, "ci95": [lo, hi]}


def sae_summary(latents: Sequence[dict]) -> dict:
  """Mean of each metric over the SAE's scored latents (unscored ones left out and counted), plus the latents."""
  out = {}
  for m in METRICS:
    vals = [lat[m] for lat in latents if lat.get(m) is not None]
    out[m] = _finite(np.mean(vals)) if vals else None
    out[f"{m}_num_scored"] = len(vals)
  out["num_latents"] = len(latents)
  out["num_unscored"] = sum(1 for lat in latents if not lat.get("scored", True))
  out["latents"] = list(latents)
  return out


def paired(joint: Sequence[dict], solo: Sequence[dict], seed: int = 0) -> dict:
  """Per metric over pairs scored on both sides: bootstrap intervals, paired t-test and Wilcoxon signed-rank test."""
  out = {"num_pairs": len(joint)}
  for m in METRICS:
    both = [(j[m], s[m]) for j, s in zip(joint, solo) if j.get(m) is not None and s.get(m) is not None]
    a = np.asarray([p[0] for p in both], np.float64)
    b = np.asarray([p[1] for p in both], np.float64)
    d = a - b
    entry = {"num_scored": len(both), "joint": _mean_ci(a, seed), "solo": _mean_ci(b, seed + 1),
             "difference": _mean_ci(d, seed + 2),
             "mean_difference": _finite(np.mean(d)) if len(d) else None,
             "t": None, "p": None, "wilcoxon_statistic": None, "wilcoxon_p": None,
             "joint_win_fraction": _finite(np.mean(a > b)) if len(d) else None,
             "tie_fraction": _finite(np.mean(a == b)) if len(d) else None,
             "differences": [float(x) for x in d]}
    if len(d) >= 2 and np.ptp(d) > 0:
      test = scipy.stats.ttest_rel(a, b)
      entry["t"], entry["p"] = _finite(test.statistic), _finite(test.pvalue)
    if np.count_nonzero(d) >= 1:
      w = scipy.stats.wilcoxon(a, b)
      entry["wilcoxon_statistic"], entry["wilcoxon_p"] = _finite(w.statistic), _finite(w.pvalue)
    out[m] = entry
  return out


def _ci(x: dict) -> str:
  lo, hi = x["ci95"]
  return "n/a" if x["mean"] is None else f"{x['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def report_markdown(scores: dict) -> str:
  """report.md: one row per scorer with joint, solo and paired difference (mean [95 % bootstrap CI]) and tests."""
  p = scores["paired"]
  lines = ["# Autointerp report", "",
           f"LLM {markdown.code(scores['llm'])}; {scores['num_tokens']} tokens; {p['num_pairs']} matched pairs. "
           "Joint and solo latents of a pair are scored on the same held-out contexts. "
           f"Means with {CONFIDENCE:.0%} percentile-bootstrap intervals over latents "
           f"({BOOTSTRAP_RESAMPLES} resamples); p-values of the paired t-test and Wilcoxon signed-rank test.",
           "", "| scorer | pairs scored | joint | solo | joint − solo | t-test p | Wilcoxon p |",
           "|---|---|---|---|---|---|---|"]
  for m in METRICS:
    e = p[m]
    lines.append(f"| {LABELS[m]} | {e['num_scored']} | {_ci(e['joint'])} | {_ci(e['solo'])} | "
                 f"{_ci(e['difference'])} | {_fmt(e['p'])} | {_fmt(e['wilcoxon_p'])} |")
  counts = scores.get("scorer_counts", {})
  lines += ["", "Contexts per latent: " + "; ".join(
      f"{k} {v['activating']} activating + {v['negative']} non-activating" for k, v in counts.items()) + ".",
            f"LLM requests: {scores['llm_requests']} sent, {scores['llm_cache_hits']} from the cache, "
            f"{scores.get('llm_retries', 0)} retries, {scores.get('llm_failed_requests', 0)} failed after "
            f"retries; {scores.get('unscored_latents', 0)} latents unscored (left out, not counted as zero).",
            "", f"![paired differences]({HISTOGRAM})", ""]
  return "\n".join(lines)


def plot_differences(scores: dict, path: str) -> None:
  """Histogram of the per-pair joint − solo differences, one panel per scorer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), squeeze=False)
  for ax, m in zip(axes[0], METRICS):
    e = scores["paired"][m]
    d = np.asarray(e["differences"], np.float64)
    if len(d):
      ax.hist(d, bins=min(30, max(5, len(d) // 3)), color="#4878a8")
      ax.axvline(0, color="k", lw=0.8)
      if e["difference"]["mean"] is not None:
        ax.axvline(e["difference"]["mean"], color="#c44e52", lw=1.2, label="mean")
        ax.axvspan(*e["difference"]["ci95"], color="#c44e52", alpha=0.15, label="95% CI")
        ax.legend(fontsize=7)
    ax.set_title(LABELS[m], fontsize=8)
    ax.set_xlabel("joint − solo (per pair)", fontsize=8)
  axes[0][0].set_ylabel("pairs")
  fig.tight_layout()
  atomic.write_with(path, lambda f: fig.savefig(f, format="png", dpi=110))
  plt.close(fig)


def write_report(out_dir: str, scores: dict) -> None:
  atomic.write_text(os.path.join(out_dir, "report.md"), report_markdown(scores))
  plot_differences(scores, os.path.join(out_dir, HISTOGRAM))


def explanations_markdown(scores: dict) -> str:
  """A human-readable page: one section per matched pair with both explanations and scores."""
  lines = ["# Autointerp explanations", "",
           f"LLM: {markdown.code(scores['llm'])}; {scores['num_tokens']} tokens; pairs: {scores['paired']['num_pairs']}.",
           "", "| SAE | mean fuzz ρ | mean fuzz balanced acc. | mean detection balanced acc. |",
           "|---|---|---|---|"]
  for name in SAE_NAMES:
    s = scores[name]
    lines.append(f"| {name} | " + " | ".join(_fmt(s[m]) for m in METRICS) + " |")
  lines.append("")
  for i, (j, s) in enumerate(zip(scores["joint"]["latents"], scores["solo"]["latents"]), 1):
    lines.append(f"## Pair {i}: joint {j['id']} / solo {s['id']} (decoder cosine {_fmt(j['pair_cosine'])})")
    lines.append("")
    for name, lat in (("joint", j), ("solo", s)):
      if not lat.get("scored", True):
        lines.append(f"- **{name} {lat['id']}** — unscored (LLM requests failed after retries)")
        continue
      lines.append(f"- **{name} {lat['id']}** — {markdown.text(lat['explanation'])}  ")
      lines.append(f"  fuzz ρ {_fmt(lat['fuzz_spearman'])}, fuzz balanced acc. "
                   f"{_fmt(lat['fuzz_balanced_accuracy'])}, detection balanced acc. "
                   f"{_fmt(lat['detection_balanced_accuracy'])}, fired {lat['num_fired']}×, "
                   f"malformed answers {lat['failed_answers']}, failed requests {lat['failed_requests']}")
    lines.append("")
  return "\n".join(lines)


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.3f}"
