"""λ₂ × σ² (× seed) grid over one store: one run directory per point, resumable, optionally parallel and evaluated.

Each point is trained, then evaluated, by `python -m metasae_jax.workflows.run_point`
in its own process (so points run side by side and a crash stays in its point);
the trainer resumes interrupted points by itself. With an evaluation config every
point is evaluated on a held-out store and the sweep writes `summary.json` and
`pareto.png`: Δ mean|φ| % against ΔMSE % of each point's joint SAE vs its own
lockstep solo baseline (the paper's Table 1). With several seeds, every grid
point is trained once per seed (each joint with its own solo) and the summary
adds per-point means ± sd and a paired t-test across seeds.
"""

import concurrent.futures
import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import scipy.stats

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.evaluation.evaluate import EvalConfig
from metasae_jax.storage import artifact, atomic
from metasae_jax.storage.store import read_manifest
from metasae_jax.training.trainer import METRICS, RunConfig
from metasae_jax.workflows import run_point

SUMMARY = "summary.json"
PARETO = "pareto.png"
LOGS = "logs"
REPORT = "report.json"
SAE_DIRS = ("joint", "solo", os.path.join("joint", "meta"))
# Joint-vs-solo differences summarised over seeds (report.json "comparison" keys, as row keys).
DELTAS = ("delta_mean_abs_phi_pct", "delta_mse_pct", "delta_fvu_pct")
PAIRED_TEST_ASSUMES = (
    "paired t-test of joint vs solo mean |φ| across seeds: each seed gives one (joint, solo) pair trained on "
    "identical batches; it assumes the per-seed differences are independent draws from a normal distribution "
    "(n - 1 degrees of freedom) and captures variation of init and data order only, not of the store itself.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
  """A λ₂ × σ² (× seed) grid of training runs sharing every other setting."""
  out_dir: str
  """Sweep directory: one run directory per point, logs/, summary.json, pareto.png."""
  lambda2s: tuple
  """Penalty weights λ₂ (paper grid: 0.1, 0.3, 1.0); 0 is the no-penalty control, run once per seed."""
  sigma_sqs: tuple
  """Penalty bandwidths σ² (paper grid: 0.3, 1.0, 3.0)."""
  train: TrainConfig
  """Every other training setting; its lambda2, sigma_sq (and seed, when `seeds` is set) are replaced per point."""
  run: RunConfig
  """Data and checkpointing settings; its out_dir is replaced by each point's run directory."""
  seeds: tuple = ()
  """Seeds each grid point is trained at (run directories get a _seed{s} suffix); () = train.seed, no suffix."""
  parallel: int = 1
  """Points trained at once (each its own process)."""
  evaluation: Optional[EvalConfig] = None
  """Evaluate every point on a held-out store (its run_dir is replaced per point); None skips evaluation."""
  python: str = sys.executable
  """Interpreter for the per-point processes."""

  def __post_init__(self):
    if not self.lambda2s or not self.sigma_sqs:
      raise UserError("--lambda2 and --sigma_sq each need at least one value.")
    if any(not math.isfinite(v) or v < 0 for v in self.lambda2s):
      raise UserError(f"--lambda2 values must be >= 0, got {list(self.lambda2s)}.")
    if any(not math.isfinite(v) or v <= 0 for v in self.sigma_sqs):
      raise UserError(f"--sigma_sq values must be > 0, got {list(self.sigma_sqs)}.")
    if len(set(self.seeds)) != len(self.seeds) or any(int(s) != s or s < 0 for s in self.seeds):
      raise UserError(f"--seeds must be distinct integers >= 0, got {list(self.seeds)}.")
    if self.parallel < 1:
      raise UserError(f"--parallel must be >= 1, got {self.parallel}.")


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point (at one seed) and its run directory name."""
  lambda2: float
  sigma_sq: float
  seed: Optional[int] = None
  """None: the training config's seed, and the name has no seed suffix (sweeps without --seeds)."""

  @property
  def name(self) -> str:
    base = f"lam{self.lambda2:g}_sig{self.sigma_sq:g}"
    return base if self.seed is None else f"{base}_seed{self.seed}"


def grid(lambda2s: Sequence[float], sigma_sqs: Sequence[float], seeds: Sequence[int] = ()) -> list:
  """Grid points in flag order (seeds innermost); λ₂ = 0 (no penalty, σ² unused) appears once per seed."""
  points = []
  for lam in lambda2s:
    for sig in (sigma_sqs[:1] if lam == 0 else sigma_sqs):
      for seed in (tuple(seeds) or (None,)):
        p = Point(float(lam), float(sig), None if seed is None else int(seed))
        if p not in points:
          points.append(p)
  return points


def parse_floats(text: str, flag: str) -> tuple:
  """'0.1,0.3,1' -> (0.1, 0.3, 1.0), with a clear error naming the flag."""
  try:
    values = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise UserError(f"--{flag} must be a comma-separated list of numbers, got {text!r}.") from None
  if not values:
    raise UserError(f"--{flag} needs at least one value.")
  return values


def parse_ints(text: str, flag: str) -> tuple:
  """'0,1,2' -> (0, 1, 2); '' -> ()."""
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise UserError(f"--{flag} must be a comma-separated list of integers, got {text!r}.") from None


def is_trained(run_dir: str) -> bool:
  """Artifacts present (joint, meta, and solo unless --nobaseline) with the final checkpoint they came from."""
  try:
    with open(os.path.join(run_dir, "joint", artifact.CFG)) as f:
      cfg = json.load(f)
    final = cfg["trained_tokens"] // cfg["train_config"]["batch_size"]
    baseline = cfg["train_config"].get("baseline", True)
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
    return False
  saes = [d for d in SAE_DIRS if baseline or d != "solo"]
  return (all(os.path.exists(os.path.join(run_dir, d, artifact.WEIGHTS)) for d in saes)
          and os.path.isdir(os.path.join(run_dir, "checkpoints", str(final))))


def is_evaluated(run_dir: str) -> bool:
  """A report.json that describes the SAE weights on disk now, by content (a retrained point is evaluated
  again; a rerun that changed no byte is not). Reports without recorded digests fall back to file times."""
  path = os.path.join(run_dir, REPORT)
  try:
    with open(path) as f:
      recorded = json.load(f).get("artifact_sha256")
  except (OSError, ValueError, AttributeError):
    return False
  present = [s for s in artifact.SAE_NAMES if os.path.exists(os.path.join(run_dir, s, artifact.WEIGHTS))]
  if isinstance(recorded, dict) and recorded:
    return all(recorded.get(s) == artifact.weights_digest(os.path.join(run_dir, s)) for s in present)
  return all(os.path.getmtime(path) >= os.path.getmtime(os.path.join(run_dir, s, artifact.WEIGHTS))
             for s in present)


def _tail(path: str, lines: int = 15) -> str:
  """Last lines of a log, with progress-bar carriage returns turned into line breaks."""
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except OSError:
    return ""
  rows = [r for r in text.replace("\r", "\n").splitlines() if r.strip()]
  return "\n".join(rows[-lines:])


def _import_root() -> str:
  """The directory this package was imported from, so each point's process imports the same code."""
  package_dir = importlib.util.find_spec("metasae_jax").submodule_search_locations[0]
  return os.path.dirname(os.path.abspath(package_dir))


def _run_stage(cfg: SweepConfig, point: Point, stage: str, logs: str) -> tuple[int, str]:
  """Runs one stage of a point in its own process, output in logs/NAME.STAGE.log. Returns (exit code, log)."""
  run_dir = os.path.join(cfg.out_dir, point.name)
  spec = os.path.join(logs, f"{point.name}.{stage}.json")
  log_path = os.path.join(logs, f"{point.name}.{stage}.log")
  if stage == "train":
    seed = cfg.train.seed if point.seed is None else point.seed
    train = dataclasses.replace(cfg.train, lambda2=point.lambda2, sigma_sq=point.sigma_sq, seed=seed)
    run_point.write_spec(spec, stage, train=train, run=dataclasses.replace(cfg.run, out_dir=run_dir))
  else:
    run_point.write_spec(spec, stage, evaluate=dataclasses.replace(cfg.evaluation, run_dir=run_dir))
  cmd = [cfg.python, "-m", run_point.__name__, spec]
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_import_root(), env.get("PYTHONPATH")) if p)
  with open(log_path, "w") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  return code, log_path


def _do_point(cfg: SweepConfig, point: Point) -> dict:
  """Trains (or resumes, or skips) one point, then evaluates it if asked. Returns its status."""
  run_dir = os.path.join(cfg.out_dir, point.name)
  logs = os.path.join(cfg.out_dir, LOGS)
  os.makedirs(logs, exist_ok=True)
  t0 = time.time()
  seed = cfg.train.seed if point.seed is None else point.seed
  result = {"name": point.name, "lambda2": point.lambda2, "sigma_sq": point.sigma_sq, "seed": seed,
            "run_dir": run_dir}
  if is_trained(run_dir):
    result["train"] = "skipped (finished)"
  else:
    code, log = _run_stage(cfg, point, "train", logs)
    if code != 0 or not is_trained(run_dir):
      return dict(result, train="failed", error=f"training exited with {code}; log {log}", stderr_tail=_tail(log))
    result["train"] = "trained"
  if cfg.evaluation is not None:
    if is_evaluated(run_dir):
      result["eval"] = "skipped (report.json present)"
    else:
      code, log = _run_stage(cfg, point, "evaluate", logs)
      if code != 0 or not is_evaluated(run_dir):
        return dict(result, eval="failed", error=f"evaluation exited with {code}; log {log}",
                    stderr_tail=_tail(log))
      result["eval"] = "evaluated"
  result["seconds"] = round(time.time() - t0, 1)
  return result


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
  """A point's row: training metrics and, when evaluated, joint vs solo deltas (Table 1 columns)."""
  run_dir = status["run_dir"]
  row = dict(status)
  m = _last_metrics(run_dir)
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


def aggregate(rows: list) -> list:
  """Per (λ₂, σ²): mean ± sd over seeds of the joint-vs-solo deltas, and the paired test of mean |φ|."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["lambda2"], r["sigma_sq"]), []).append(r)
  out = []
  for (lam, sig), members in groups.items():
    agg = {"lambda2": lam, "sigma_sq": sig, "seeds": [r.get("seed") for r in members],
           "runs": [r["name"] for r in members], "failed": [r["name"] for r in members if "error" in r]}
    for key in DELTAS:
      values = [r.get(key) for r in members]
      if key == "delta_mse_pct":  # before evaluation, the training batches' MSE is all there is
        values = [r.get(key, r.get("train_delta_mse_pct")) for r in members]
      agg[key] = mean_sd_of(values)
    agg["paired_mean_abs_phi"] = paired_test([r.get("joint", {}).get("mean_abs_phi") for r in members],
                                             [r.get("solo", {}).get("mean_abs_phi") for r in members])
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


def run_sweep(cfg: SweepConfig, report=print) -> dict:
  """Runs every point (skipping finished ones), then writes summary.json (+ pareto.png when evaluated).

  Failures do not stop the other points; they are listed in the result's
  "failed" entries (with the tail of the point's log) and in summary.json.
  """
  os.makedirs(cfg.out_dir, exist_ok=True)
  points = grid(cfg.lambda2s, cfg.sigma_sqs, cfg.seeds)
  report(f"sweep: {len(points)} runs in {cfg.out_dir} ({cfg.parallel} at a time)")
  statuses = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
    futures = {pool.submit(_do_point, cfg, p): p for p in points}
    for fut in concurrent.futures.as_completed(futures):
      p = futures[fut]
      try:
        status = fut.result()
      except Exception as e:  # a bug in the driver itself, not in the point's process
        status = {"name": p.name, "lambda2": p.lambda2, "sigma_sq": p.sigma_sq,
                  "seed": cfg.train.seed if p.seed is None else p.seed,
                  "run_dir": os.path.join(cfg.out_dir, p.name), "train": "failed", "error": repr(e),
                  "stderr_tail": ""}
      statuses[p] = status
      state = "FAILED" if "error" in status else f"{status.get('train')}, {status.get('eval', 'not evaluated')}"
      report(f"  {p.name}: {state}")
  rows = [point_summary(statuses[p]) for p in points]
  aggregates = aggregate(rows)
  summary = {"out_dir": os.path.abspath(cfg.out_dir), "lambda2": list(cfg.lambda2s),
             "sigma_sq": list(cfg.sigma_sqs), "seeds": list(cfg.seeds) or [cfg.train.seed],
             "train": {k: v for k, v in cfg.train.to_dict().items()  # the settings every point shares
                       if k not in ("lambda2", "sigma_sq") and not (k == "seed" and cfg.seeds)},
             "run": {k: v for k, v in dataclasses.asdict(cfg.run).items() if k != "out_dir"},
             "evaluation": ({k: v for k, v in dataclasses.asdict(cfg.evaluation).items() if k != "run_dir"}
                            if cfg.evaluation else None),
             "points": rows, "aggregates": aggregates, "paired_test_assumes": PAIRED_TEST_ASSUMES,
             "failed": [r["name"] for r in rows if "error" in r]}
  summary["pareto"] = pareto_plot(aggregates, os.path.join(cfg.out_dir, PARETO))
  atomic.write_json(os.path.join(cfg.out_dir, SUMMARY), _finite(summary))
  return summary


def _finite(obj):
  """JSON-safe: NaN/Inf become null."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
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
    status = ("failed: " + ", ".join(a["failed"])) if a["failed"] else ", ".join(
        sorted({r.get("eval", r.get("train", "")) for r in members}))
    p = a["paired_mean_abs_phi"]["p"]
    out.append(f"| {a['lambda2']:g} | {a['sigma_sq']:g} | {len(a['runs'])} | "
               f"{mean_sd(a['delta_mean_abs_phi_pct'])} | {mean_sd(a['delta_mse_pct'])} | "
               f"{mean_sd(a['delta_fvu_pct'])} | {'—' if p is None else format(p, '.3g')} | {status} |")
  if any(a["delta_mean_abs_phi_pct"]["n"] > 1 for a in summary["aggregates"]):
    out += ["", "mean ± sd over seeds; " + PAIRED_TEST_ASSUMES]
  return "\n".join(out)
