"""λ₂ × σ² grid over one store: one run directory per point, resumable, optionally parallel and evaluated.

Each point is an ordinary `experiments.train` run in `out_dir/lam{λ₂}_sig{σ²}`
(a subprocess, so points can run side by side and a crash stays in its point);
the trainer resumes interrupted points by itself. With a held-out store every
point is evaluated (`experiments.evaluate`) and the sweep writes `summary.json`
and `pareto.png`: Δ mean|φ| % against ΔMSE % of each point's joint SAE vs its
own lockstep solo baseline (the paper's Table 1).
"""

import concurrent.futures
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from metasae_jax.storage import atomic
from metasae_jax.core.errors import UserError

SUMMARY = "summary.json"
PARETO = "pareto.png"
LOGS = "logs"
REPORT = "report.json"
SAE_DIRS = ("joint", "solo", os.path.join("joint", "meta"))
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
  """How each finished point is evaluated (the arguments of `experiments.evaluate`)."""
  activations: str
  """Held-out activation store (not the training store)."""
  num_tokens: int = 0
  """Evaluation tokens after skipping; 0 = the whole held-out store."""
  model: str = "none"
  """Model for ΔCE: "none" skips it (the default here: it loads the model once per point), "" = the store's."""
  batch_size: int = 4096
  """Tokens per evaluation batch (the sweep passes the training --batch_size)."""
  meta_fve_steps: int = 500
  """Steps of the fresh meta SAE for meta FVE; 0 skips it."""
  skip_first_positions: int = 0
  """Positions left out of evaluation (0 = all; fvu_excl_first is reported either way)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
  """A λ₂ × σ² grid of training runs sharing every other flag."""
  out_dir: str
  """Sweep directory: one run directory per point, logs/, summary.json, pareto.png."""
  lambda2s: tuple
  """Penalty weights λ₂ (paper grid: 0.1, 0.3, 1.0); 0 is the no-penalty control, run once."""
  sigma_sqs: tuple
  """Penalty bandwidths σ² (paper grid: 0.3, 1.0, 3.0)."""
  train_args: tuple = ()
  """Every other `experiments.train` flag, as `--name=value` strings (no --lambda2/--sigma_sq/--out_dir)."""
  parallel: int = 1
  """Points trained at once (each a subprocess)."""
  evaluation: Optional[EvalSpec] = None
  """Evaluate every point on a held-out store; None skips evaluation (no pareto.png)."""
  python: str = sys.executable
  """Interpreter for the per-point subprocesses."""

  def __post_init__(self):
    if not self.lambda2s or not self.sigma_sqs:
      raise UserError("--lambda2 and --sigma_sq each need at least one value.")
    if any(not math.isfinite(v) or v < 0 for v in self.lambda2s):
      raise UserError(f"--lambda2 values must be >= 0, got {list(self.lambda2s)}.")
    if any(not math.isfinite(v) or v <= 0 for v in self.sigma_sqs):
      raise UserError(f"--sigma_sq values must be > 0, got {list(self.sigma_sqs)}.")
    if self.parallel < 1:
      raise UserError(f"--parallel must be >= 1, got {self.parallel}.")
    for arg in self.train_args:
      name = arg.lstrip("-").split("=")[0]
      if name in ("lambda2", "sigma_sq", "out_dir"):
        raise UserError(f"train_args must not set --{name}: the sweep sets it per point.")


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point and its run directory name."""
  lambda2: float
  sigma_sq: float

  @property
  def name(self) -> str:
    return f"lam{self.lambda2:g}_sig{self.sigma_sq:g}"


def grid(lambda2s: Sequence[float], sigma_sqs: Sequence[float]) -> list:
  """Grid points in flag order; λ₂ = 0 (no penalty, σ² unused) appears once, with the first σ²."""
  points = []
  for lam in lambda2s:
    for sig in (sigma_sqs[:1] if lam == 0 else sigma_sqs):
      p = Point(float(lam), float(sig))
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


def is_trained(run_dir: str) -> bool:
  """Artifacts present (joint, meta, and solo unless --nobaseline) with the final checkpoint they came from."""
  try:
    with open(os.path.join(run_dir, "joint", "cfg.json")) as f:
      cfg = json.load(f)
    final = cfg["trained_tokens"] // cfg["train_config"]["batch_size"]
    baseline = cfg["train_config"].get("baseline", True)
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
    return False
  saes = [d for d in SAE_DIRS if baseline or d != "solo"]
  return (all(os.path.exists(os.path.join(run_dir, d, "sae.safetensors")) for d in saes)
          and os.path.isdir(os.path.join(run_dir, "checkpoints", str(final))))


def is_evaluated(run_dir: str) -> bool:
  return os.path.exists(os.path.join(run_dir, REPORT))


def _tail(path: str, lines: int = 15) -> str:
  """Last lines of a log, with progress-bar carriage returns turned into line breaks."""
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except OSError:
    return ""
  rows = [r for r in text.replace("\r", "\n").splitlines() if r.strip()]
  return "\n".join(rows[-lines:])


def _run_logged(cmd: list, log_path: str) -> int:
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
  with open(log_path, "w") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def train_command(cfg: SweepConfig, point: Point) -> list:
  return [cfg.python, "-m", "experiments.train", *cfg.train_args, f"--lambda2={point.lambda2!r}",
          f"--sigma_sq={point.sigma_sq!r}", f"--out_dir={os.path.join(cfg.out_dir, point.name)}"]


def eval_command(cfg: SweepConfig, point: Point) -> list:
  e = cfg.evaluation
  return [cfg.python, "-m", "experiments.evaluate", f"--run_dir={os.path.join(cfg.out_dir, point.name)}",
          f"--activations={e.activations}", f"--num_tokens={e.num_tokens}", f"--model={e.model}",
          f"--batch_size={e.batch_size}", f"--meta_fve_steps={e.meta_fve_steps}",
          f"--skip_first_positions={e.skip_first_positions}"]


def _do_point(cfg: SweepConfig, point: Point) -> dict:
  """Trains (or resumes, or skips) one point, then evaluates it if asked. Returns its status."""
  run_dir = os.path.join(cfg.out_dir, point.name)
  logs = os.path.join(cfg.out_dir, LOGS)
  t0 = time.time()
  result = {"name": point.name, "lambda2": point.lambda2, "sigma_sq": point.sigma_sq, "run_dir": run_dir}
  if is_trained(run_dir):
    result["train"] = "skipped (finished)"
  else:
    log = os.path.join(logs, f"{point.name}.train.log")
    code = _run_logged(train_command(cfg, point), log)
    if code != 0 or not is_trained(run_dir):
      return dict(result, train="failed", error=f"experiments.train exited with {code}; log {log}",
                  stderr_tail=_tail(log))
    result["train"] = "trained"
  if cfg.evaluation is not None:
    if is_evaluated(run_dir):
      result["eval"] = "skipped (report.json present)"
    else:
      log = os.path.join(logs, f"{point.name}.eval.log")
      code = _run_logged(eval_command(cfg, point), log)
      if code != 0 or not is_evaluated(run_dir):
        return dict(result, eval="failed", error=f"experiments.evaluate exited with {code}; log {log}",
                    stderr_tail=_tail(log))
      result["eval"] = "evaluated"
  result["seconds"] = round(time.time() - t0, 1)
  return result


def _last_metrics(run_dir: str) -> dict:
  try:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
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
    for sae in ("joint", "solo"):
      row[sae] = {k: report.get(sae, {}).get(k) for k in keys}
    comp = report.get("comparison", {})
    row["delta_mean_abs_phi_pct"] = comp.get("mean_abs_phi_pct")
    row["delta_mse_pct"] = comp.get("mse_pct")
    row["delta_fvu_pct"] = comp.get("fvu_pct")
    row["welch_p"] = comp.get("welch_p")
  return row


def pareto_plot(rows: list, path: str) -> Optional[str]:
  """Δ mean|φ| % (down = more atomic) vs ΔMSE % (left = better reconstruction), one marker per point."""
  pts = [r for r in rows if r.get("delta_mean_abs_phi_pct") is not None and r.get("delta_mse_pct") is not None]
  if not pts:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  sigmas = sorted({r["sigma_sq"] for r in pts})
  cmap = plt.get_cmap("viridis")
  for r in pts:
    color = "black" if r["lambda2"] == 0 else cmap(sigmas.index(r["sigma_sq"]) / max(1, len(sigmas) - 1))
    ax.scatter(r["delta_mse_pct"], r["delta_mean_abs_phi_pct"], color=color, s=20 + 40 * r["lambda2"],
               zorder=3)
    label = "control (λ₂=0)" if r["lambda2"] == 0 else f"λ₂={r['lambda2']:g}, σ²={r['sigma_sq']:g}"
    ax.annotate(label, (r["delta_mse_pct"], r["delta_mean_abs_phi_pct"]), fontsize=7,
                xytext=(4, 3), textcoords="offset points")
  ax.axhline(0, color="grey", lw=0.6)
  ax.axvline(0, color="grey", lw=0.6)
  ax.set_xlabel("ΔMSE % (joint vs its solo)")
  ax.set_ylabel("Δ mean |φ| % (joint vs its solo)")
  ax.set_title("MetaSAE sweep: atomicity vs reconstruction")
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
  points = grid(cfg.lambda2s, cfg.sigma_sqs)
  report(f"sweep: {len(points)} points in {cfg.out_dir} ({cfg.parallel} at a time)")
  statuses = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
    futures = {pool.submit(_do_point, cfg, p): p for p in points}
    for fut in concurrent.futures.as_completed(futures):
      p = futures[fut]
      try:
        status = fut.result()
      except Exception as e:  # a bug in the driver itself, not in the point's subprocess
        status = {"name": p.name, "lambda2": p.lambda2, "sigma_sq": p.sigma_sq,
                  "run_dir": os.path.join(cfg.out_dir, p.name), "train": "failed", "error": repr(e),
                  "stderr_tail": ""}
      statuses[p] = status
      state = "FAILED" if "error" in status else f"{status.get('train')}, {status.get('eval', 'not evaluated')}"
      report(f"  {p.name}: {state}")
  rows = [point_summary(statuses[p]) for p in points]
  summary = {"out_dir": os.path.abspath(cfg.out_dir), "lambda2": list(cfg.lambda2s),
             "sigma_sq": list(cfg.sigma_sqs), "train_args": list(cfg.train_args),
             "evaluation": dataclasses.asdict(cfg.evaluation) if cfg.evaluation else None,
             "points": rows, "failed": [r["name"] for r in rows if "error" in r]}
  summary["pareto"] = pareto_plot(rows, os.path.join(cfg.out_dir, PARETO))
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


def table(summary: dict) -> str:
  """The paper's Table 1 layout as Markdown: one row per point, joint vs its own solo."""
  out = ["| λ₂ | σ² | Δ mean\\|φ\\| % | ΔMSE % | ΔFVU % | status |", "|---|---|---|---|---|---|"]

  def fmt(v):
    return "—" if v is None else f"{v:+.2f}"

  for r in summary["points"]:
    status = "failed" if "error" in r else r.get("eval", r.get("train", ""))
    out.append(f"| {r['lambda2']:g} | {r['sigma_sq']:g} | {fmt(r.get('delta_mean_abs_phi_pct'))} | "
               f"{fmt(r.get('delta_mse_pct', r.get('train_delta_mse_pct')))} | "
               f"{fmt(r.get('delta_fvu_pct'))} | {status} |")
  return "\n".join(out)
