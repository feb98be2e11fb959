"""Evaluation plots (matplotlib Agg, PNG): |φ| histograms joint vs solo, matched-pair cosines, metric bars.

Legend: N = latents; |φ| histograms are over log10 |φ| of all live pairs.
"""

import io
import os

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


def metric_bars(per_sae: dict, path: str,
                keys=("fvu", "mse", "l0", "dead_fraction", "mean_abs_phi", "delta_ce_pct", "meta_fve")) -> str:
  """One small bar chart per metric, bars = SAEs (name -> metrics dict)."""
  keys = [k for k in keys if any(isinstance(m.get(k), (int, float)) and np.isfinite(m.get(k))
                                 for m in per_sae.values())]
  fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(2.2 * max(1, len(keys)), 3.2), squeeze=False)
  names = list(per_sae)
  for ax, key in zip(axes[0], keys):
    vals = [per_sae[n].get(key) if isinstance(per_sae[n].get(key), (int, float)) else np.nan for n in names]
    ax.bar(names, vals, color=["C0", "C1", "C2", "C3"][:len(names)])
    ax.set_title(key, fontsize=9)
    ax.tick_params(labelsize=8)
  fig.tight_layout()
  return save_png(fig, path)


def write_all(run_dir: str, phi_stats: dict, per_sae: dict, cosine=None) -> list:
  """All plots of a report; returns the file names written."""
  paths = [phi_histograms(phi_stats, os.path.join(run_dir, "phi_hist.png")),
           metric_bars(per_sae, os.path.join(run_dir, "metrics.png"))]
  if cosine is not None:
    paths.append(cosine_histogram(cosine, os.path.join(run_dir, "matched_cosine.png")))
  return [os.path.basename(p) for p in paths]
