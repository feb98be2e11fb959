"""report.json / report.md of an evaluation: assembling the stages' outputs, the joint-vs-solo comparison, markdown.

Legend: N = latents. Per-SAE keys that exist in older reports keep their names and meaning, except
`mean_abs_phi`, now over all N(N−1)/2 pairs (the live-pair mean moved to `mean_abs_phi_live`).
"""

import math
import os

import numpy as np

from metasae_jax.storage import artifact, atomic, markdown as md

SAE_NAMES = artifact.SAE_NAMES
PER_SAE_KEYS = ("fvu", "fvu_excl_first", "fvu_typical", "outlier_tokens", "fvu_outliers", "outlier_variance_share",
                "mse", "l0", "dead_fraction",
                "num_dead", "num_live", "mean_abs_phi", "mean_abs_phi_live", "delta_ce_pct", "delta_ce_pct_se",
                "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_recovered", "meta_fve")
# What each metric is, for report.md (which positions, which space).
DEFINITIONS = {
    "fvu": "raw-space FVU over all evaluation positions (position 0 is mostly the attention sink)",
    "fvu_excl_first": "raw-space FVU with the first position of each context left out",
    "fvu_typical": "raw-space FVU over tokens with norm <= 10x the median (no sink-like tokens)",
    "fvu_outliers": "the part of fvu made by the outlier tokens (norm > 10x the median): their squared error over "
                    "fvu's denominator",
    "outlier_variance_share": "the part of the raw variance (fvu's denominator) the outlier tokens hold",
    "mse": "MSE on standardised inputs over all evaluation positions (the paper's L2)",
    "mean_abs_phi": "mean |φ| over all n(n−1)/2 latent pairs, a pair with a dead latent counting as 0 (headline)",
    "mean_abs_phi_live": "mean |φ| over pairs of live latents only",
    "delta_ce_pct_se": "standard error of ΔCE % over contexts",
}
DEAD_GAP_WARNING = 0.01  # of the width: joint and solo dead counts further apart make the two φ means diverge


def clean(obj):
  """JSON without NaN/Inf (null instead) and with numpy scalars as Python numbers."""
  if isinstance(obj, dict):
    return {str(k): clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [clean(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return clean(obj.tolist())
  if isinstance(obj, (np.integer, np.bool_)):
    return obj.item()
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def pct(a, b):
  if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
    return None
  return (a - b) / abs(b) * 100.0


def _diff(a, b):
  return None if a is None or b is None else a - b


def comparison(per_sae: dict, welch: tuple, ce_pair: dict) -> dict:
  """Joint-vs-solo percent differences (the keys the sweep and the pipeline read stay as they were)."""
  j, s = per_sae["joint"], per_sae["solo"]
  welch_t, welch_p = welch
  return {"mean_abs_phi_pct": pct(j["mean_abs_phi"], s["mean_abs_phi"]),
          "mean_abs_phi_live_pct": pct(j["mean_abs_phi_live"], s["mean_abs_phi_live"]),
          "fvu_pct": pct(j["fvu"], s["fvu"]), "fvu_excl_first_pct": pct(j["fvu_excl_first"], s["fvu_excl_first"]),
          "fvu_typical_pct": pct(j["fvu_typical"], s["fvu_typical"]), "mse_pct": pct(j["mse"], s["mse"]),
          "delta_ce_pp": ce_pair.get("delta_ce_pp", _diff(j["delta_ce_pct"], s["delta_ce_pct"])),
          "delta_ce_pp_se": ce_pair.get("delta_ce_pp_se"),
          "meta_fve_diff": _diff(j["meta_fve"], s["meta_fve"]),
          "num_dead_diff": _diff(j["num_dead"], s["num_dead"]),
          "welch_t": welch_t, "welch_p": welch_p,
          "welch_note": ("Welch t-test of mean |φ| over all pairs, treating the dependent pairs as "
                         "independent (the paper's test); see bootstrap for an interval that does not")}


def outlier_note(per_sae: dict, factor: float) -> list:
  """How much of each SAE's raw fvu the high-norm (sink-like) tokens make, when there are any."""
  rows = {n: r for n, r in per_sae.items() if r.get("outlier_tokens")}
  if not rows:
    return []
  first = next(iter(rows.values()))
  parts = [f"{n} {r['fvu_outliers']:.3g} of {r['fvu']:.3g} ({r['fvu_outliers'] / r['fvu']:.0%})"
           for n, r in rows.items() if r["fvu"]]
  return [f"{first['outlier_tokens']} held-out tokens have more than {factor:g}x the median norm (attention-sink-"
          f"like tokens) and hold {first['outlier_variance_share']:.0%} of the raw variance; of the raw fvu, "
          + ", ".join(parts) + " comes from them. fvu_typical leaves them out"]


def dead_gap_note(per_sae: dict, width: int) -> list:
  """A warning when joint and solo differ in dead latents by more than 1 % of the width."""
  j, s = per_sae.get("joint", {}), per_sae.get("solo", {})
  if j.get("num_dead") is None or s.get("num_dead") is None:
    return []
  gap = abs(j["num_dead"] - s["num_dead"])
  if gap <= DEAD_GAP_WARNING * width:
    return []
  return [f"WARNING: joint has {j['num_dead']} dead latents and solo {s['num_dead']} (a gap of {gap}, more than "
          f"{DEAD_GAP_WARNING:.0%} of the width {width}): mean_abs_phi (all pairs) and mean_abs_phi_live "
          "move apart; compare both"]


def write(run_dir: str, report: dict, candidates: list) -> dict:
  """Writes split_candidates.json, report.json and report.md; returns the cleaned report."""
  report = clean(report)
  atomic.write_json(os.path.join(run_dir, "split_candidates.json"), clean(candidates))
  # The content this report describes (thresholds included): reruns key on it, not on file times.
  report["artifact_sha256"] = {name: artifact.weights_digest(os.path.join(run_dir, name))
                               for name in SAE_NAMES
                               if os.path.exists(os.path.join(run_dir, name, artifact.WEIGHTS))}
  atomic.write_json(os.path.join(run_dir, "report.json"), report)
  atomic.write_text(os.path.join(run_dir, "report.md"), markdown(report))
  return report


def _fmt(v) -> str:
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.4g}"
  return md.text(v)  # names and paths from manifests and cfg.json are foreign text


def _interval(iv: dict) -> str:
  if not isinstance(iv, dict) or iv.get("low") is None:
    return "–"
  text = f"{iv['estimate']:+.3g} %, interval [{iv['low']:+.3g} %, {iv['high']:+.3g} %], SE {iv['se']:.3g}"
  if iv.get("bias") is not None:  # reports written before the BCa change have neither
    text += f", replicate bias {iv['bias']:+.2g} ({iv['method']})"
  return text


def markdown(report: dict) -> str:
  """A human-readable summary of report.json."""
  names = [n for n in SAE_NAMES if n in report]
  lines = [f"# Evaluation of {md.text(report['run_dir'])}", "",
           f"Held-out store {md.code(report['activations'])}, {report['num_tokens']} tokens, firing "
           f"`{report['firing']}`, batch {report['batch_size']}; {report['skip']['rule']}.", "",
           "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for key in PER_SAE_KEYS:
    lines.append(f"| {key} | " + " | ".join(_fmt(report[n].get(key)) for n in names) + " |")
  lines += ["", "Definitions:", ""] + [f"- {k}: {v}" for k, v in DEFINITIONS.items()]
  warnings = [n for n in report.get("notes", []) if n.startswith("WARNING")]
  if warnings:
    lines += [""] + [f"**{md.text(w)}**" for w in warnings]
  if "comparison" in report:
    lines += ["", "## Joint vs solo", ""] + [f"- {k}: {_fmt(v)}" for k, v in report["comparison"].items()
                                             if not isinstance(v, dict)]
    boot = report["comparison"].get("bootstrap") or {}
    if boot.get("method"):
      lines += ["", f"### {boot['level']:.0%} bootstrap intervals (joint vs solo, %)", "",
                f"{boot['method']}; {boot['replicates']} replicates over {boot['num_blocks']} blocks of "
                f"{boot['contexts_per_block']} context(s); φ over {boot.get('mean_abs_phi_num_tokens')} tokens.", ""]
      lines += [f"- {k}: {_interval(boot.get(k))}" for k in ("mean_abs_phi_pct", "mse_pct", "fvu_pct")]
    elif boot:
      lines += ["", f"Bootstrap: {_fmt(boot.get('skipped'))}"]
  if report.get("matching"):
    lines += ["", "## Matching", ""] + [f"- {k}: {_fmt(v)}" for k, v in report["matching"].items()]
  ce = report.get("delta_ce") or {}
  if not ce.get("skipped"):
    lines += ["", "## ΔCE", ""] + [f"- {k}: {_fmt(v)}" for k, v in ce.items()]
  if report.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {md.text(n)}" for n in report["notes"]]
  lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", [])), ""]
  return "\n".join(lines)
