"""λ₂ × σ² (× seed) sweep: one training run per grid point, resumable, evaluated and summarised.

  python -m experiments.sweep --activations STORE --out_dir runs/sweep \\
      --lambda2 0,0.1,0.3,1.0 --sigma_sq 0.3,1.0,3.0 --width 4096 --k 64 --parallel 2 [--seeds 0,1,2]
  python -m experiments.sweep --activations STORE --out_dir runs/sweep --config experiments/configs/tiny.py

Takes every `experiments.train` flag and `--config` (shared by all points; a config's grid is used unless
--lambda2/--sigma_sq/--seeds are given); --lambda2 and --sigma_sq are comma-separated lists, --seeds trains every
point at several seeds. Every point is evaluated on the held-out view of the store (STORE/heldout) unless
--eval_activations names another held-out store or --noevaluate; summary.json and pareto.png follow.
Rerunning the same command skips finished points and resumes interrupted ones.

Beyond one machine, let your scheduler run the points (docs/sweeps.md has a SLURM array script):

  python -m experiments.sweep ARGS --list_points         # the count and the index -> point table
  python -m experiments.sweep ARGS --point_index I       # only point I, exactly as the sweep runs it
  python -m experiments.sweep ARGS --summarize           # summary.json over the points finished so far

Points are numbered λ₂ in the order given, then σ², then seed (λ₂ = 0 once per seed); every launch needs the
same ARGS. A --point_index launch may itself be multi-process (--distributed, or --coordinator_address,
--num_processes and --process_id on every process of the point).
"""

import dataclasses
import json
import sys
from typing import Optional

from absl import flags

from experiments import cli
from experiments import train  # defines every training flag; the sweep builds each point's config from them
from metasae_jax.evaluation.evaluate import EvalConfig
from metasae_jax.storage import atomic, lock
from metasae_jax.workflows import sweep, sweep_state

F = flags.FLAGS
# The sweep varies these two over a grid; every other training flag is shared by all points.
delattr(F, "lambda2")
delattr(F, "sigma_sq")
# One held-out store for the points' evaluation and (with --eval_every_steps) their validation during training.
delattr(F, "eval_activations")
flags.DEFINE_string("lambda2", "0.1,0.3,1.0", "Comma-separated penalty weights; 0 adds the no-penalty control. "
                    "Paper grid: 0.1,0.3,1.0.")
flags.DEFINE_string("sigma_sq", "0.3,1.0,3.0", "Comma-separated penalty bandwidths. Paper grid: 0.3,1.0,3.0.")
flags.DEFINE_string("seeds", "", "Comma-separated seeds: every grid point is trained at each (run directories "
                    "NAME_seedS; summary.json adds mean ± sd and a paired t-test across seeds). Empty = --seed, "
                    "one run per point named as before.")
flags.DEFINE_integer("parallel", 1, "Grid points trained at once on this machine, each as its own process.")
flags.DEFINE_integer("point_index", None, "Run only grid point I (0-based, see --list_points), exactly as the "
                     "whole sweep would: for a scheduler's job array, one task per point. Takes multi-process "
                     "flags for a point that spans several processes.")
flags.DEFINE_bool("summarize", False, "Write summary.json (and pareto.png) from the points finished so far, and "
                  "list the others (running, failed, interrupted, not started); trains nothing.")
flags.DEFINE_bool("list_points", False, "Print the number of points and the index -> point table with each "
                  "point's state, then exit.")
flags.DEFINE_bool("evaluate", True, "Evaluate every point (summary.json gets the held-out metrics, pareto.png).")
flags.DEFINE_string("eval_activations", None, "Held-out store to evaluate on; default: the held-out view of "
                    "--activations (STORE/heldout, written by the exporter).")
flags.DEFINE_bool("allow_train_tokens", False, "Allow --eval_activations that share tokens with the training data.")
# The evaluation's own fields default to EvalConfig's (its batch size and skip rule are each point's training ones).
flags.DEFINE_integer("eval_num_tokens", EvalConfig.num_tokens, "Evaluation tokens per point after skipping; 0 = the "
                     "whole store.")
flags.DEFINE_string("eval_model", "none", "Model for ΔCE in each point's evaluation; 'none' skips ΔCE, "
                    "'' uses the store's source model.")
flags.DEFINE_integer("eval_meta_fve_steps", EvalConfig.meta_fve_steps, "Fresh meta SAE steps for meta FVE per "
                     "SAE; 0 skips it.")
flags.adopt_module_key_flags(train)  # `sweep --help` lists the train flags it accepts


def _grid() -> tuple:
  """λ₂, σ² and seeds: the flags when given, else the config's grid, else the flags' defaults."""
  grid = train.resolved_config(lambda2=0.0, sigma_sq=1.0).get("grid") or {}
  def pick(name, parse, flag_value):
    if F[name].present or not grid.get(name if name != "seeds" else "seeds"):
      return parse(flag_value, name)
    return tuple(grid[name])
  return (pick("lambda2", sweep.parse_floats, F.lambda2), pick("sigma_sq", sweep.parse_floats, F.sigma_sq),
          pick("seeds", sweep.parse_ints, F.seeds))


def _multi_process() -> Optional[dict]:
  """The multi-process flags as sharding.initialize_distributed arguments; None when none is given."""
  if not (F.coordinator_address or F.distributed or F.num_processes or F.process_id is not None):
    return None
  return {"coordinator_address": F.coordinator_address, "num_processes": F.num_processes,
          "process_id": F.process_id, "auto": F.distributed}


def _check_modes(distributed: Optional[dict]) -> None:
  modes = [name for name, on in (("--point_index", F.point_index is not None), ("--summarize", F.summarize),
                                 ("--list_points", F.list_points)) if on]
  if len(modes) > 1:
    raise sweep.UserError(f"{' and '.join(modes)} cannot be combined; pass one of them.")
  if distributed and F.point_index is None:
    raise sweep.UserError("multi-process flags (--distributed, --coordinator_address, ...) apply to one point "
                          "run across processes: add --point_index I. The whole sweep runs its points as "
                          "processes on this host (--parallel N).")
  if F.point_index is not None and F["parallel"].present:
    raise sweep.UserError("--parallel runs several points on this machine; a --point_index launch runs one point. "
                          "Pass one of them.")


def _summarize(config: sweep.SweepConfig) -> None:
  summary = sweep.summarize(config)
  print(sweep.table(summary))
  for line in sweep.states_report(summary):
    print(line, file=sys.stderr)
  print(f"wrote {config.out_dir}/{sweep.SUMMARY}" + (f" and {summary['pareto']}" if summary["pareto"] else ""))
  if summary["failed"]:
    raise sweep.UserError(f"{len(summary['failed'])} of {len(summary['points'])} points failed: "
                          f"{', '.join(summary['failed'])} (their logs are in {config.out_dir}/logs; rerun them "
                          "with --point_index).")


def _one_point(config: sweep.SweepConfig, distributed: Optional[dict]) -> None:
  result = sweep.run_point_index(config, F.point_index, distributed)
  if "busy" in result:
    raise sweep.UserError(result["busy"])
  if "error" in result:
    print(sweep_state.tail(result.get("log")), file=sys.stderr)
    raise sweep.UserError(f"point {F.point_index} ({result['name']}) failed: {result['error']} (rerun the same "
                          "command to retry; finished stages are kept).")


def main(argv):
  del argv
  distributed = _multi_process()
  _check_modes(distributed)
  lambda2s, sigma_sqs, seeds = _grid()
  # Validated once here with the grid's first point, so a bad flag fails before any process starts.
  train_config, run = train.configs_from_flags(lambda2=lambda2s[0], sigma_sq=sigma_sqs[0])
  evaluation = None
  if F.evaluate:
    held = cli.evaluation_store(F.eval_activations, run.activations, F.allow_train_tokens, "the sweep",
                                flag="--eval_activations")
    evaluation = EvalConfig(run_dir="", activations=held, num_tokens=F.eval_num_tokens, model=F.eval_model,
                            batch_size=train_config.batch_size, meta_fve_steps=F.eval_meta_fve_steps,
                            skip_first_positions=run.skip_first_positions)
  config = sweep.SweepConfig(out_dir=F.out_dir, lambda2s=lambda2s, sigma_sqs=sigma_sqs, train=train_config,
                             run=run, seeds=seeds, parallel=F.parallel,
                             evaluation=evaluation, python=sys.executable)
  if F.dry_run:
    print(json.dumps({"grid": {"lambda2": lambda2s, "sigma_sq": sigma_sqs, "seeds": seeds},
                      "train": train_config.to_dict(), "run": dataclasses.asdict(run),
                      "evaluation": dataclasses.asdict(evaluation) if evaluation else None}, indent=2, default=str))
    return
  if F.list_points:
    print(sweep.points_table(config))
    return
  atomic.check_output_dir(config.out_dir, "--out_dir")
  if F.summarize:
    _summarize(config)
    return
  if F.point_index is not None:
    _one_point(config, distributed)
    return
  with lock.DirLock(config.out_dir, "sweep directory"):  # two sweeps would train the same points twice
    summary = sweep.run_sweep(config)
  print(sweep.table(summary))
  if summary["pareto"]:
    print(f"wrote {summary['pareto']}")
  elif evaluation is None:
    print("--noevaluate: points not evaluated, no pareto.png")
  failed = [r for r in summary["points"] if "error" in r]
  for r in failed:
    print(f"\n{r['name']} failed: {r['error']}\n{r.get('stderr_tail', '')}", file=sys.stderr)
  if failed:
    raise sweep.UserError(f"{len(failed)} of {len(summary['points'])} points failed: "
                          f"{', '.join(r['name'] for r in failed)} (rerun to retry them; finished points are kept).")
  if not summary["complete"]:  # points another launch (--point_index) holds
    for line in sweep.states_report(summary):
      print(line, file=sys.stderr)
    raise sweep.UserError("not every point finished (see above); rerun, or --summarize once they are done.")


if __name__ == "__main__":
  cli.run(main)
