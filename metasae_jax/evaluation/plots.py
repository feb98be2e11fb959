"""Evaluation plots (matplotlib Agg, PNG): |φ| histograms joint vs solo, matched-pair cosines, metric bars
(labelled with their units, 95 % error bars where the report has the interval).

Legend: N = latents; |φ| histograms are over log10 |φ| of all live pairs.
"""

import io
import os
from typing import NamedTuple, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from metasae_jax.storage import atomic  # noqa: E402


def save_png(fig, path: str) -> str:
  """Writes a matplotlib figure as a PNG atomically and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  atomic.write_bytes(path, buf.getvalue())
  return path


def phi_histograms(stats: dict, path: str) -> str:
  """Normalised histograms of log10 |φ| over live pairs per SAE (name -> PhiStats), live mean marked."""
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for name, s in stats.items():
    if s.num_live_pairs == 0:
      continue
    centers = 0.5 * (s.hist_edges[1:] + s.hist_edges[:-1])
    ax.step(centers, s.hist_counts / s.num_live_pairs, where="mid",
            label=f"{name} (live mean {s.mean_abs_phi_live:.3g}, all pairs {s.mean_abs_phi:.3g})")
    ax.axvline(np.log10(max(s.mean_abs_phi_live, 1e-12)), ls="--", lw=0.8, color=ax.lines[-1].get_color())
  ax.set_xlabel("log10 |φ| over pairs of live latents")
  ax.set_ylabel("fraction of pairs")
  ax.set_title("Co-occurrence |φ|")
  ax.legend()
  return save_png(fig, path)


def cosine_histogram(cosine: np.ndarray, path: str) -> str:
  """Decoder cosine of the Hungarian-matched joint/solo pairs."""
  fig, ax = plt.subplots(figsize=(6.4, 4))
  ax.hist(cosine, bins=50, range=(min(-0.1, float(np.min(cosine, initial=0))), 1.0))
  ax.set_xlabel("decoder cosine of matched joint–solo pair")
  ax.set_ylabel("pairs")
  ax.set_title(f"Matched pairs: median cosine {np.median(cosine) if len(cosine) else float('nan'):.3f}")
  return save_png(fig, path)


# Per-SAE metrics on metrics.png: y-axis label with its unit, and the key of its standard error (95 % bars).
METRIC_AXES = {
    "fvu": ("raw-space FVU, all positions", None),
    "fvu_excl_first": ("raw-space FVU, first position out", None),
    "fvu_typical": ("raw-space FVU, sink-like tokens out", None),
    "mse": ("MSE on standardised inputs", None),
    "l0": ("active latents per token", None),
    "dead_fraction": ("fraction of latents never firing", None),
    "mean_abs_phi": ("mean |φ| over all latent pairs", None),
    "delta_ce_pct": ("ΔCE, % of clean CE (±95 %)", "delta_ce_pct_se"),
    "meta_fve": ("meta FVE, fraction of variance", None),
}
# Joint-vs-solo differences with bootstrap intervals (report.json comparison.bootstrap), in % of solo.
DIFF_AXES = {"mean_abs_phi_pct": "mean |φ|", "mse_pct": "MSE", "fvu_pct": "raw FVU"}
Z95 = 1.959964


class Panel(NamedTuple):
  """One bar chart of metrics.png: bars with optional asymmetric error bars (lower, upper lengths)."""
  title: str
  ylabel: str
  labels: list
  values: list
  err_low: Optional[list]
  err_high: Optional[list]


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def bar_panels(per_sae: dict, comparison: Optional[dict] = None) -> list:
  """The panels of metrics.png: one per metric any SAE has (95 % bars where the report has a standard error),
  then the joint-vs-solo % differences with their bootstrap intervals when the report has them."""
  panels, names = [], list(per_sae)
  for key, (ylabel, se_key) in METRIC_AXES.items():
    values = [per_sae[n].get(key) if _number(per_sae[n].get(key)) else np.nan for n in names]
    if not any(np.isfinite(values)):
      continue
    err = None
    if se_key and any(_number(per_sae[n].get(se_key)) for n in names):
      err = [Z95 * per_sae[n][se_key] if _number(per_sae[n].get(se_key)) else 0.0 for n in names]
    panels.append(Panel(key, ylabel, names, values, err, err))
  boot = (comparison or {}).get("bootstrap") or {}
  diffs = [(k, label) for k, label in DIFF_AXES.items()
           if isinstance(boot.get(k), dict) and _number(boot[k].get("estimate"))]
  if diffs:
    ivs = [boot[k] for k, _ in diffs]
    have = all(_number(iv.get("low")) and _number(iv.get("high")) for iv in ivs)
    panels.append(Panel(f"joint vs solo ({boot.get('level', 0.95):.0%} bootstrap interval)",
                        "joint − solo, % of solo", [label for _, label in diffs], [iv["estimate"] for iv in ivs],
                        [iv["estimate"] - iv["low"] for iv in ivs] if have else None,
                        [iv["high"] - iv["estimate"] for iv in ivs] if have else None))
  return panels


def metric_bars(per_sae: dict, path: str, comparison: Optional[dict] = None) -> str:
  """One labelled bar chart per metric (bars = SAEs), plus the joint-vs-solo differences (see bar_panels)."""
  panels = bar_panels(per_sae, comparison) or [Panel("no metrics", "", [], [], None, None)]
  cols = min(5, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 3.0 * rows), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, panel in zip(axes.flat, panels):
    colors = ["C0", "C1", "C2", "C3"][:len(panel.labels)] if "vs" not in panel.title else "C7"
    yerr = None if panel.err_low is None else [panel.err_low, panel.err_high]
    ax.bar(panel.labels, panel.values, color=colors, yerr=yerr, capsize=4 if yerr is not None else 0)
    if "vs" in panel.title:
      ax.axhline(0, color="k", lw=0.8)
    ax.set_title(panel.title, fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=8)
  fig.tight_layout()
  return save_png(fig, path)


def write_all(run_dir: str, phi_stats: dict, per_sae: dict, cosine=None, comparison: Optional[dict] = None) -> list:
  """All plots of a report; returns the file names written."""
  paths = [phi_histograms(phi_stats, os.path.join(run_dir, "phi_hist.png")),
           metric_bars(per_sae, os.path.join(run_dir, "metrics.png"), comparison)]
  if cosine is not None:
    paths.append(cosine_histogram(cosine, os.path.join(run_dir, "matched_cosine.png")))
  return [os.path.basename(p) for p in paths]
