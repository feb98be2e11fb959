"""λ₂ × σ² (× seed) grid over one store: one run directory per point, resumable, parallel or one point at a time.

Each point is trained, then evaluated, by `python -m metasae_jax.workflows.run_point`
in its own process (so points run side by side and a crash stays in its point);
the trainer resumes interrupted points by itself. With an evaluation config every
point is evaluated on a held-out store and the sweep writes `summary.json` and
`pareto.png`: Δ mean|φ| % against ΔMSE % of each point's joint SAE vs its own
lockstep solo baseline (the paper's Table 1). With several seeds, every grid
point is trained once per seed (each joint with its own solo) and the summary
adds per-point means ± sd and a paired t-test across seeds.

Beyond one machine a scheduler runs the points: `run_point_index` runs grid point I
exactly as `run_sweep`'s own worker would (same processes, same directory layout),
and `summarize` aggregates whatever has finished. Points are numbered in `grid`
order; each point's lock (logs/NAME.lock) keeps two launches of it from running at
once, and sweep.json keeps launches with other settings out of the directory.
"""

import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import os
import sys
from typing import Optional, Sequence

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import Interrupted, UserError
from metasae_jax.evaluation.evaluate import EvalConfig
from metasae_jax.storage import atomic
from metasae_jax.training.trainer import RunConfig
from metasae_jax.workflows import run_point, sweep_report, sweep_state, workers as workers_lib
# The names callers of this module have always used (pipeline, tests).
from metasae_jax.workflows.sweep_report import (  # noqa: F401  pylint: disable=unused-import
    DELTAS, PAIRED_TEST_ASSUMES, PARETO, SUMMARY, aggregate, mean_sd, mean_sd_of, paired_test, point_summary,
    states_report, table)
from metasae_jax.workflows.sweep_state import LOGS, REPORT, is_evaluated, is_trained  # noqa: F401

SWEEP_JSON = "sweep.json"
SWEEP_FORMAT = "metasae-sweep/1"
LOCK_WAIT_S = 5.0
"""How long a point's launcher retries its lock (a `--summarize` probing it holds it for microseconds)."""


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


# ---- The sweep's settings, recorded once: launches with other settings are refused ----

def identity(cfg: SweepConfig) -> dict:
  """What every point of the sweep shares (sweep.json): training settings but the grid's, data, evaluation.

  The algorithm (slots or dense: the same loss) and the mesh are how a point runs, not what it is.
  """
  train = {k: v for k, v in cfg.train.to_dict().items()
           if k not in ("lambda2", "sigma_sq", "algorithm") and not (k == "seed" and cfg.seeds)}
  data = {"activations": os.path.abspath(cfg.run.activations), "num_tokens": cfg.run.num_tokens,
          "skip_first_positions": cfg.run.skip_first_positions}
  evaluation = None
  if cfg.evaluation is not None:
    evaluation = {k: v for k, v in dataclasses.asdict(cfg.evaluation).items() if k not in ("run_dir", "progress")}
    evaluation["activations"] = os.path.abspath(evaluation["activations"])
  return sweep_report.json_safe({"format": SWEEP_FORMAT, "train": train, "data": data, "evaluation": evaluation})


def check_identity(cfg: SweepConfig, record: bool) -> None:
  """Refuses a sweep directory whose sweep.json records other settings; `record` writes it if missing.

  The first launch to create sweep.json wins (hard link of a whole temp file), so array tasks started at
  once with different flags cannot both record theirs.
  """
  path = os.path.join(cfg.out_dir, SWEEP_JSON)
  want = identity(cfg)
  if not os.path.exists(path):
    if not record:
      return
    temp = f"{path}.{os.getpid()}.new"
    atomic.write_json(temp, want)
    try:
      os.link(temp, path)
    except FileExistsError:
      pass
    finally:
      os.remove(temp)
  try:
    with open(path) as f:
      have = sweep_report.json_safe(json.load(f))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); restore it or use a new --out_dir (nothing was changed).") from None
  if not isinstance(have, dict) or have.get("format") != SWEEP_FORMAT:
    raise UserError(f"{path} is not a sweep record; use a new --out_dir (nothing was changed).")
  diffs = []
  for section in ("train", "data", "evaluation"):
    old, new = have.get(section), want[section]
    if old is None or new is None:
      if old != new:
        diffs.append(f"{section}: {'off' if old is None else 'on'} -> {'off' if new is None else 'on'}")
      continue
    diffs += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k)]
  if diffs:
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise UserError(f"--out_dir {cfg.out_dir} holds a sweep with other settings ({shown}). Pass the flags it was "
                    f"started with (recorded in {path}) or use a new --out_dir (nothing was changed).")


# ---- One point: its stages as processes, under its lock ----

@dataclasses.dataclass(frozen=True)
class Launch:
  """Which process of a point's launch this is: process 0 (the only one by default) locks, evaluates, records."""
  process_id: int = 0
  distributed: Optional[dict] = None
  """sharding.initialize_distributed arguments for a multi-process point's training; None = one process."""

  @property
  def lead(self) -> bool:
    return self.process_id == 0

  @property
  def tag(self) -> str:
    return "" if self.lead else f".p{self.process_id}"


def _import_root() -> str:
  """The directory this package was imported from, so each point's process imports the same code."""
  package_dir = importlib.util.find_spec("metasae_jax").submodule_search_locations[0]
  return os.path.dirname(os.path.abspath(package_dir))


def point_seed(cfg: SweepConfig, point: Point) -> int:
  return cfg.train.seed if point.seed is None else point.seed


def _run_stage(cfg: SweepConfig, point: Point, stage: str, workers: workers_lib.Workers,
               launch: Launch) -> tuple:
  """Runs one stage of a point in its own process, output in logs/NAME.STAGE.log. Returns (exit code, log)."""
  run_dir = os.path.join(cfg.out_dir, point.name)
  logs = os.path.join(cfg.out_dir, LOGS)
  spec = os.path.join(logs, f"{point.name}.{stage}{launch.tag}.json")
  log_path = os.path.join(logs, f"{point.name}.{stage}{launch.tag}.log")
  if stage == "train":
    train = dataclasses.replace(cfg.train, lambda2=point.lambda2, sigma_sq=point.sigma_sq,
                                seed=point_seed(cfg, point))
    run_point.write_spec(spec, stage, train=train, run=dataclasses.replace(cfg.run, out_dir=run_dir),
                         distributed=launch.distributed)
  else:
    run_point.write_spec(spec, stage, evaluate=dataclasses.replace(cfg.evaluation, run_dir=run_dir))
  cmd = [cfg.python, "-m", run_point.__name__, spec]
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_import_root(), env.get("PYTHONPATH")) if p)
  with open(log_path, "w") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    code = workers.run(cmd, log, env)
  return code, log_path


def _do_point(cfg: SweepConfig, point: Point, workers: workers_lib.Workers, launch: Launch = Launch()) -> dict:
  """Trains (or resumes, or skips) one point, then evaluates it if asked, holding its lock. Returns what
  happened: "train"/"eval" outcomes, or "error" (with "log"), or "busy" when another process runs it."""
  run_dir = os.path.join(cfg.out_dir, point.name)
  os.makedirs(os.path.join(cfg.out_dir, LOGS), exist_ok=True)
  result = {"name": point.name, "lambda2": point.lambda2, "sigma_sq": point.sigma_sq,
            "seed": point_seed(cfg, point), "run_dir": run_dir}
  if not launch.lead:  # another process of a multi-process point: it trains with process 0, nothing else
    if is_trained(run_dir):
      return dict(result, train="skipped (finished)")
    code, log = _run_stage(cfg, point, "train", workers, launch)
    if code != 0:
      return dict(result, error=f"training exited with {code}; log {log}", log=log)
    return dict(result, train="trained", eval="process 0 evaluates")
  if workers.stopped is not None:
    return dict(result, stopped=True)
  lock = sweep_state.point_lock(cfg.out_dir, point.name)
  try:
    lock.acquire(wait_seconds=LOCK_WAIT_S)
  except UserError as e:
    return dict(result, busy=str(e))
  try:
    return _do_locked_point(cfg, point, workers, launch, result)
  except BaseException as e:
    sweep_state.write_status(cfg.out_dir, point.name, sweep_state.FAILED, error=f"the sweep itself failed: {e!r}")
    raise
  finally:
    lock.release()


def _do_locked_point(cfg, point, workers, launch, result) -> dict:
  run_dir = result["run_dir"]

  def ended(stage: str, code: Optional[int], log: str) -> dict:
    if workers.stopped is not None:  # a forwarded SIGINT/SIGTERM: the stage saved its state and stopped
      sweep_state.write_status(cfg.out_dir, point.name, sweep_state.INTERRUPTED, stage=stage, log=log)
      return dict(result, stopped=True)
    error = f"{'training' if stage == 'train' else 'evaluation'} exited with {code}; log {log}"
    sweep_state.write_status(cfg.out_dir, point.name, sweep_state.FAILED, stage=stage, error=error, log=log)
    return dict(result, error=error, log=log)

  if is_trained(run_dir):
    result["train"] = "skipped (finished)"
  else:
    sweep_state.write_status(cfg.out_dir, point.name, sweep_state.RUNNING, stage="train")
    code, log = _run_stage(cfg, point, "train", workers, launch)
    if code != 0 or not is_trained(run_dir):
      return ended("train", code, log)
    result["train"] = "trained"
  if cfg.evaluation is not None:
    if is_evaluated(run_dir):
      result["eval"] = "skipped (report.json present)"
    else:
      sweep_state.write_status(cfg.out_dir, point.name, sweep_state.RUNNING, stage="evaluate")
      code, log = _run_stage(cfg, point, "evaluate", workers, launch)
      if code != 0 or not is_evaluated(run_dir):
        return ended("evaluate", code, log)
      result["eval"] = "evaluated"
  if sweep_state.read_status(cfg.out_dir, point.name).get("state") != sweep_state.FINISHED:
    sweep_state.write_status(cfg.out_dir, point.name, sweep_state.FINISHED)  # a rerun that did nothing writes nothing
  return result


def outcome(result: dict) -> str:
  """One line for what `_do_point` did."""
  if "busy" in result:
    return f"not run: {result['busy']}"
  if result.get("stopped"):
    return "stopped by a signal (rerun to resume)"
  if "error" in result:
    return f"FAILED: {result['error']}"
  return f"{result.get('train')}, {result.get('eval', 'not evaluated')}"


# ---- Whole sweeps, single points, summaries ----

def _stopped(workers: workers_lib.Workers) -> Interrupted:
  return Interrupted(f"sweep stopped by signal {workers.stopped}: running points saved a checkpoint; rerun the "
                     "same command to resume them", workers.stopped)


def run_sweep(cfg: SweepConfig, report=print) -> dict:
  """Runs every point (skipping finished ones), then writes summary.json (+ pareto.png when evaluated).

  Failures do not stop the other points; they are listed in the result's "failed" entries (with the tail
  of the point's log) and in summary.json. SIGINT/SIGTERM stop the running points at a step boundary
  (they save a checkpoint) and raise Interrupted after the summary is written.
  """
  os.makedirs(cfg.out_dir, exist_ok=True)
  check_identity(cfg, record=True)
  points = grid(cfg.lambda2s, cfg.sigma_sqs, cfg.seeds)
  report(f"sweep: {len(points)} runs in {cfg.out_dir} ({cfg.parallel} at a time)")
  with workers_lib.Workers() as workers, concurrent.futures.ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
    futures = {pool.submit(_do_point, cfg, p, workers): p for p in points}
    for fut in concurrent.futures.as_completed(futures):
      p = futures[fut]
      try:
        line = outcome(fut.result())
      except Exception as e:  # a bug in the driver itself (recorded as the point's failure), not in its process
        line = f"FAILED: {e!r}"
      report(f"  {p.name}: {line}")
  summary = sweep_report.write_summary(cfg, points)
  if workers.stopped is not None:
    raise _stopped(workers)
  return summary


def detected_process_id() -> int:
  """This process's index in an auto-detected cluster (SLURM, Open MPI, TPU pod), without starting JAX's
  distributed client (the point's training process does that)."""
  try:
    from jax._src.clusters import cluster  # pylint: disable=g-import-not-at-top  (JAX's own detection)
    env = next((e for e in cluster.ClusterEnv._cluster_types  # pylint: disable=protected-access
                if not e.opt_in_only_method and e.is_env_present()), None)
    if env is not None:
      return int(env.get_process_id())
  except Exception:  # noqa: BLE001  (a private API: any failure means "cannot tell")
    pass
  raise UserError("--point_index with --distributed: cannot tell this process's index from the environment "
                  "(no SLURM, Open MPI or TPU pod found). Pass --coordinator_address, --num_processes and "
                  "--process_id instead.")


def run_point_index(cfg: SweepConfig, index: int, distributed: Optional[dict] = None, report=print) -> dict:
  """Runs grid point `index` as `run_sweep`'s worker would; returns `_do_point`'s result plus its state.

  With `distributed` (sharding.initialize_distributed arguments) the point trains as one multi-process
  run: every process calls this; process 0 also takes the point's lock, evaluates and records its status.
  """
  points = grid(cfg.lambda2s, cfg.sigma_sqs, cfg.seeds)
  if not 0 <= index < len(points):
    raise UserError(f"--point_index {index} is out of range: this sweep has {len(points)} points "
                    f"(0..{len(points) - 1}); list them with --list_points.")
  point = points[index]
  launch = Launch()
  if distributed:
    pid = distributed.get("process_id")
    launch = Launch(process_id=detected_process_id() if pid is None else int(pid), distributed=distributed)
  os.makedirs(cfg.out_dir, exist_ok=True)
  check_identity(cfg, record=launch.lead)
  report(f"sweep point {index} of {len(points)}: {point.name} in {cfg.out_dir}"
         + ("" if launch.lead else f" (process {launch.process_id}: training only)"))
  with workers_lib.Workers() as workers:
    result = _do_point(cfg, point, workers, launch)
  if "busy" not in result:  # the caller reports that one as its error
    report(f"  {point.name}: {outcome(result)}")
  if workers.stopped is not None:
    raise _stopped(workers)
  return dict(result, index=index)


def summarize(cfg: SweepConfig) -> dict:
  """summary.json for a sweep whose points ran elsewhere (a scheduler's array); reads the points, runs none."""
  if not (os.path.exists(os.path.join(cfg.out_dir, SWEEP_JSON)) or os.path.isdir(os.path.join(cfg.out_dir, LOGS))):
    raise UserError(f"--out_dir {cfg.out_dir} holds no sweep (no {SWEEP_JSON}, no {LOGS}/): no point of it has run. "
                    "Run its points (--point_index I, or the whole sweep) first; nothing was written.")
  check_identity(cfg, record=False)
  return sweep_report.write_summary(cfg, grid(cfg.lambda2s, cfg.sigma_sqs, cfg.seeds))




def points_table(cfg: SweepConfig) -> str:
  """The index -> point table (`--list_points`), with each point's state."""
  return sweep_report.points_table(cfg, grid(cfg.lambda2s, cfg.sigma_sqs, cfg.seeds))
