"""Training curves from a run's metrics.jsonl (joint vs solo), as one PNG."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("fvu", "FVU (training batches)"), ("mse", "MSE, standardised"), ("dead_fraction", "dead fraction"))


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(run_dir: str, out_path: str = "") -> str:
  """Writes training_curves.png: FVU, MSE, dead fraction per SAE, and the penalty / meta MSE."""
  rows = read_metrics(run_dir)
  if not rows:
    return ""
  out_path = out_path or os.path.join(run_dir, "training_curves.png")
  tokens = [r["tokens"] for r in rows]
  fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4.2 * (len(PANELS) + 1), 3.4))
  for ax, (key, title) in zip(axes, PANELS):
    for sae, color in (("joint", "tab:blue"), ("solo", "tab:orange")):
      if f"{sae}/{key}" in rows[0]:
        ax.plot(tokens, [r[f"{sae}/{key}"] for r in rows], color=color, label=sae)
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.legend()
  ax = axes[-1]
  ax.plot(tokens, [r["penalty"] for r in rows], color="tab:green", label="penalty (mean p_i)")
  ax.plot(tokens, [r["meta_mse"] for r in rows], color="tab:red", label="meta MSE")
  ax.set_title("meta SAE")
  ax.set_xlabel("tokens")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path + ".tmp.png", dpi=110)
  plt.close(fig)
  os.replace(out_path + ".tmp.png", out_path)
  return out_path
