"""Training curves from a run's metrics.jsonl (joint vs solo, training batches and held-out validation), as one PNG."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("fvu", "FVU"), ("mse", "MSE, standardised"), ("l0", "L0"), ("dead_fraction", "dead fraction"))
SAES = (("joint", "tab:blue"), ("solo", "tab:orange"))


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list, list]:
  """(tokens, values) of the rows that carry `key` (validation lines and training lines are separate rows)."""
  picked = [r for r in rows if key in r]
  return [r["tokens"] for r in picked], [r[key] for r in picked]


def plot_training_curves(run_dir: str, out_path: str = "") -> str:
  """Writes training_curves.png: FVU, MSE, L0, dead fraction per SAE (train solid, validation dashed with
  markers), the penalty / meta MSE, and mean |φ| on the validation sample when it was measured."""
  rows = read_metrics(run_dir)
  if not rows:
    return ""
  out_path = out_path or os.path.join(run_dir, "training_curves.png")
  has_phi = any("val/joint/mean_abs_phi" in r for r in rows)
  panels = PANELS + ((("mean_abs_phi", "mean |φ|, all pairs (validation)"),) if has_phi else ())
  cols = 3
  rows_ = -(-(len(panels) + 1) // cols)
  fig, grid = plt.subplots(rows_, cols, figsize=(4.4 * cols, 3.4 * rows_), squeeze=False)
  axes = list(grid.ravel())
  for spare in axes[len(panels) + 1:]:
    spare.axis("off")
  axes = axes[:len(panels) + 1]
  for ax, (key, title) in zip(axes, panels):
    for sae, color in SAES:
      for prefix, style in (("", {"linestyle": "-"}), ("val/", {"linestyle": "--", "marker": "o", "ms": 3})):
        tokens, values = series(rows, f"{prefix}{sae}/{key}")
        if values:
          ax.plot(tokens, values, color=color, label=f"{sae} ({'validation' if prefix else 'train'})", **style)
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.legend(fontsize=7)
  ax = axes[-1]
  for key, color, label in (("penalty", "tab:green", "penalty (mean p_i)"), ("meta_mse", "tab:red", "meta MSE")):
    tokens, values = series(rows, key)
    if values:
      ax.plot(tokens, values, color=color, label=label)
  ax.set_title("meta SAE")
  ax.set_xlabel("tokens")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path + ".tmp.png", dpi=110)
  plt.close(fig)
  os.replace(out_path + ".tmp.png", out_path)
  return out_path
