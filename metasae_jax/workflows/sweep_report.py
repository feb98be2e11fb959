"""A sweep's summary: one row per point (its state, training and evaluation numbers), per-(λ₂, σ²) seed
aggregates with a paired test, the Pareto plot and the Markdown table.

A row carries numbers only from what is complete on disk: training metrics once the point is trained,
held-out metrics once its report.json describes its current weights; never from a run still in progress.
"""

import dataclasses
import io
import json
import math
import os
import warnings
from typing import Optional

import numpy as np
import scipy.stats

from metasae_jax.storage import artifact, atomic
from metasae_jax.training.trainer import METRICS
from metasae_jax.workflows import sweep_state
from metasae_jax.workflows.sweep_state import FAILED, FINISHED, REPORT, is_evaluated, is_trained

SUMMARY = "summary.json"
PARETO = "pareto.png"
# Joint-vs-solo differences summarised over seeds (report.json "comparison" keys, as row keys).
DELTAS = ("delta_mean_abs_phi_pct", "delta_mse_pct", "delta_fvu_pct")
PAIRED_TEST_ASSUMES = (
    "paired t-test of joint vs solo mean |φ| across seeds: each seed gives one (joint, solo) pair trained on "
    "identical batches; it assumes the per-seed differences are independent draws from a normal distribution "
    "(n - 1 degrees of freedom) and captures variation of init and data order only, not of the store itself.")


def _last_metrics(run_dir: str) -> dict:
  try:
    with open(os.path.join(run_dir, METRICS)) as f:
      lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else {}
  except (OSError, ValueError):
    return {}


def _pct(a, b) -> Optional[float]:
  if a is None or b is None or not b:
    return None
  return (a - b) / abs(b) * 100.0


def point_summary(status: dict) -> dict:
  """A point's row: its status fields, training metrics once trained and, once evaluated, joint vs solo deltas
  (Table 1 columns). A run still in progress contributes no numbers."""
  run_dir = status["run_dir"]
  row = dict(status)
  m = _last_metrics(run_dir) if is_trained(run_dir) else {}
  if m:
    row["train_final"] = {k: m.get(k) for k in ("step", "tokens", "joint/mse", "solo/mse", "joint/fvu",
                                                  "solo/fvu", "penalty", "meta_mse")}
    row["train_delta_mse_pct"] = _pct(m.get("joint/mse"), m.get("solo/mse"))
  if is_evaluated(run_dir):
    with open(os.path.join(run_dir, REPORT)) as f:
      report = json.load(f)
    keys = ("mse", "fvu", "l0", "dead_fraction", "mean_abs_phi", "meta_fve", "delta_ce_pct")
    for sae in artifact.SAE_NAMES:
      row[sae] = {k: report.get(sae, {}).get(k) for k in keys}
    comp = report.get("comparison", {})
    row["delta_mean_abs_phi_pct"] = comp.get("mean_abs_phi_pct")
    row["delta_mse_pct"] = comp.get("mse_pct")
    row["delta_fvu_pct"] = comp.get("fvu_pct")
    row["welch_p"] = comp.get("welch_p")
  return row


def mean_sd_of(values: list) -> dict:
  """{"mean", "sd" (n - 1 denominator; None below 2 values), "n"} of the non-missing values."""
  v = [x for x in values if x is not None and math.isfinite(x)]
  if not v:
    return {"mean": None, "sd": None, "n": 0}
  return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def paired_test(joint: list, solo: list) -> dict:
  """Paired t-test of joint vs solo values across seeds (see PAIRED_TEST_ASSUMES)."""
  pairs = [(j, s) for j, s in zip(joint, solo) if j is not None and s is not None]
  out = {"n": len(pairs), "t": None, "p": None, "mean_difference": None, "assumes": PAIRED_TEST_ASSUMES}
  if not pairs:
    return out
  diff = np.array([j - s for j, s in pairs], np.float64)
  out["mean_difference"] = float(diff.mean())
  if len(pairs) >= 2 and np.ptp(diff) > 0:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      res = scipy.stats.ttest_rel([j for j, _ in pairs], [s for _, s in pairs])
    out["t"], out["p"] = float(res.statistic), float(res.pvalue)
  return out


def state_of(row: dict) -> str:
  """A row's state; rows built outside a sweep (a preset's single run) are finished unless they carry an error."""
  return row.get("state") or (FAILED if "error" in row else FINISHED)


def aggregate(rows: list) -> list:
  """Per (λ₂, σ²): mean ± sd over seeds of the joint-vs-solo deltas, and the paired test of mean |φ|, over the
  finished points only ("failed" and "incomplete" name the others)."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["lambda2"], r["sigma_sq"]), []).append(r)
  out = []
  for (lam, sig), members in groups.items():
    agg = {"lambda2": lam, "sigma_sq": sig, "seeds": [r.get("seed") for r in members],
           "runs": [r["name"] for r in members], "failed": [r["name"] for r in members if "error" in r],
           "incomplete": [r["name"] for r in members if state_of(r) != FINISHED]}
    done = [r for r in members if state_of(r) == FINISHED]  # a point still on its way contributes nothing
    for key in DELTAS:
      values = [r.get(key) for r in done]
      if key == "delta_mse_pct":  # a sweep without evaluation: the training batches' MSE is all there is
        values = [r.get(key, r.get("train_delta_mse_pct")) for r in done]
      agg[key] = mean_sd_of(values)
    agg["paired_mean_abs_phi"] = paired_test([r.get("joint", {}).get("mean_abs_phi") for r in done],
                                             [r.get("solo", {}).get("mean_abs_phi") for r in done])
    out.append(agg)
  return out


def pareto_plot(aggregates: list, path: str) -> Optional[str]:
  """Δ mean|φ| % (down = more atomic) vs ΔMSE % (left = better reconstruction): seed means with sd bars."""
  pts = [a for a in aggregates
         if a["delta_mean_abs_phi_pct"]["mean"] is not None and a["delta_mse_pct"]["mean"] is not None]
  if not pts:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  sigmas = sorted({a["sigma_sq"] for a in pts})
  cmap = plt.get_cmap("viridis")
  for a in pts:
    x, y = a["delta_mse_pct"], a["delta_mean_abs_phi_pct"]
    color = "black" if a["lambda2"] == 0 else cmap(sigmas.index(a["sigma_sq"]) / max(1, len(sigmas) - 1))
    ax.errorbar(x["mean"], y["mean"], xerr=x["sd"], yerr=y["sd"], fmt="o", color=color, capsize=2,
                markersize=3 + 4 * a["lambda2"] ** 0.5, zorder=3)
    label = "control (λ₂=0)" if a["lambda2"] == 0 else f"λ₂={a['lambda2']:g}, σ²={a['sigma_sq']:g}"
    if y["n"] > 1:
      label += f" ({y['n']} seeds)"
    ax.annotate(label, (x["mean"], y["mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
  ax.axhline(0, color="grey", lw=0.6)
  ax.axvline(0, color="grey", lw=0.6)
  ax.set_xlabel("ΔMSE % (joint vs its solo)")
  ax.set_ylabel("Δ mean |φ| % (joint vs its solo)")
  several = any(a["delta_mean_abs_phi_pct"]["n"] > 1 for a in pts)
  ax.set_title("MetaSAE sweep: atomicity vs reconstruction" + (" (seed mean ± sd)" if several else ""))
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  atomic.write_with(path, lambda f: f.write(buf.getvalue()))
  return path


def json_safe(obj):
  """JSON-safe: NaN/Inf become null."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def mean_sd(stat: dict, spec: str = "+.2f") -> str:
  """'−7.50 ± 1.20' (n ≥ 2), '−7.50' (one value) or '—' (none)."""
  if not stat or stat.get("mean") is None:
    return "—"
  text = format(stat["mean"], spec)
  return text if stat.get("sd") is None else f"{text} ± {stat['sd']:.2f}"


def table(summary: dict) -> str:
  """The paper's Table 1 layout as Markdown: one row per (λ₂, σ²), joint vs its own solo, mean ± sd over seeds."""
  out = ["| λ₂ | σ² | seeds | Δ mean\\|φ\\| % | ΔMSE % | ΔFVU % | paired p (\\|φ\\|) | status |",
         "|---|---|---|---|---|---|---|---|"]
  rows = {r["name"]: r for r in summary["points"]}
  for a in summary["aggregates"]:
    members = [rows[n] for n in a["runs"]]
    by_state: dict = {}
    for r in sorted(members, key=lambda r: state_of(r) != FAILED):  # failures first
      if state_of(r) != FINISHED:
        by_state.setdefault(state_of(r), []).append(r["name"])
    status = "; ".join(f"{s}: {', '.join(names)}" for s, names in by_state.items()) or FINISHED
    p = a["paired_mean_abs_phi"]["p"]
    out.append(f"| {a['lambda2']:g} | {a['sigma_sq']:g} | {len(a['runs'])} | "
               f"{mean_sd(a['delta_mean_abs_phi_pct'])} | {mean_sd(a['delta_mse_pct'])} | "
               f"{mean_sd(a['delta_fvu_pct'])} | {'—' if p is None else format(p, '.3g')} | {status} |")
  if any(a["delta_mean_abs_phi_pct"]["n"] > 1 for a in summary["aggregates"]):
    out += ["", "mean ± sd over seeds; " + PAIRED_TEST_ASSUMES]
  return "\n".join(out)


def _seed(cfg, point) -> int:
  return cfg.train.seed if point.seed is None else point.seed


def _rows(cfg, points: list) -> list:
  rows = []
  for p in points:
    state = sweep_state.point_state(cfg.out_dir, p.name, cfg.evaluation is not None)
    status = {"name": p.name, "lambda2": p.lambda2, "sigma_sq": p.sigma_sq, "seed": _seed(cfg, p),
              "run_dir": os.path.join(cfg.out_dir, p.name), **state}
    rows.append(point_summary(status))
  return rows


def write_summary(cfg, points: list) -> dict:
  """summary.json (+ pareto.png) of a sweep (`cfg` a SweepConfig, `points` its grid) from what is on disk now:
  the finished points' numbers, every point's state."""
  rows = _rows(cfg, points)
  aggregates = aggregate(rows)
  states = {s: [r["name"] for r in rows if r["state"] == s] for s in sweep_state.STATES}
  summary = {"out_dir": os.path.abspath(cfg.out_dir), "lambda2": list(cfg.lambda2s),
             "sigma_sq": list(cfg.sigma_sqs), "seeds": list(cfg.seeds) or [cfg.train.seed],
             "train": {k: v for k, v in cfg.train.to_dict().items()  # the settings every point shares
                       if k not in ("lambda2", "sigma_sq") and not (k == "seed" and cfg.seeds)},
             "run": {k: v for k, v in dataclasses.asdict(cfg.run).items() if k != "out_dir"},
             "evaluation": ({k: v for k, v in dataclasses.asdict(cfg.evaluation).items() if k != "run_dir"}
                            if cfg.evaluation else None),
             "points": rows, "aggregates": aggregates, "paired_test_assumes": PAIRED_TEST_ASSUMES,
             "failed": states[sweep_state.FAILED], "states": {s: n for s, n in states.items() if n},
             "complete": len(states[sweep_state.FINISHED]) == len(rows)}
  summary["pareto"] = pareto_plot(aggregates, os.path.join(cfg.out_dir, PARETO))
  atomic.write_json(os.path.join(cfg.out_dir, SUMMARY), json_safe(summary))
  return summary


def points_table(cfg, points: list) -> str:
  """The index -> point table of a sweep (`--list_points`), with each point's state."""
  evaluate = cfg.evaluation is not None
  lines = [f"{len(points)} points in {cfg.out_dir}; run one with --point_index I (I = 0..{len(points) - 1})",
           "index\tname\tlambda2\tsigma_sq\tseed\tstate"]
  for i, p in enumerate(points):
    state = sweep_state.point_state(cfg.out_dir, p.name, evaluate)
    lines.append(f"{i}\t{p.name}\t{p.lambda2:g}\t{p.sigma_sq:g}\t{_seed(cfg, p)}\t{state['state']}")
  return "\n".join(lines)


def states_report(summary: dict) -> list:
  """Lines naming the points that are not finished, by state, with their indices and what to do."""
  index = {r["name"]: i for i, r in enumerate(summary["points"])}
  rows = {r["name"]: r for r in summary["points"]}
  states = summary.get("states", {})
  done = len(states.get(sweep_state.FINISHED, []))
  lines = [f"{done} of {len(rows)} points finished"
           + ("" if done == len(rows) else "; the summary covers the finished ones only")]
  hints = {sweep_state.RUNNING: "", FAILED: "retry with", sweep_state.INTERRUPTED: "resume with",
           sweep_state.TRAINED: "evaluate with", sweep_state.NOT_STARTED: "run with"}
  for state, hint in hints.items():
    for name in states.get(state, []):
      detail = rows[name].get("detail", "") if state != sweep_state.NOT_STARTED else ""
      todo = f"{hint} --point_index {index[name]}" if hint else f"index {index[name]}"
      lines.append(f"  {state}: {name}" + (f": {detail}" if detail else "") + f" ({todo})")
  return lines
