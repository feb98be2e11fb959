"""One stage of one sweep point in its own process: `python -m metasae_jax.workflows.run_point SPEC.json`.

The sweep writes SPEC.json (`write_spec`) and launches this module, so points
run side by side and a crash stays in its point. The spec holds plain config
fields: {"stage": "train" | "evaluate", "train": TrainConfig, "run": RunConfig,
"evaluate": EvalConfig, "distributed": arguments of
`training.sharding.initialize_distributed` for a multi-process point, or null}.
A worker started by a sweep dies with it (`workers.die_with_parent`).
"""

import dataclasses
import json
import sys
from typing import Optional

from metasae_jax.core.errors import Interrupted, UserError
from metasae_jax.storage import atomic
from metasae_jax.workflows import workers

STAGES = ("train", "evaluate")
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id", "auto")


def write_spec(path: str, stage: str, train=None, run=None, evaluate=None, distributed: Optional[dict] = None) -> None:
  """Writes the spec of one stage (`train` a TrainConfig, `run` a RunConfig, `evaluate` an EvalConfig)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}")
  if distributed and set(distributed) - set(DISTRIBUTED_KEYS):
    raise ValueError(f"unknown distributed settings {sorted(set(distributed) - set(DISTRIBUTED_KEYS))}")
  spec = {"stage": stage, "train": train.to_dict() if train else None,
          "run": dataclasses.asdict(run) if run else None,
          "evaluate": dataclasses.asdict(evaluate) if evaluate else None,
          "distributed": dict(distributed) if distributed else None}
  atomic.write_json(path, spec)


def run_spec(spec: dict) -> None:
  """Trains (resuming if interrupted) or evaluates, as the spec says."""
  if spec["stage"] == "train":
    # pylint: disable=g-import-not-at-top  (jax's backend must not start before a multi-process run joins)
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.training import sharding
    from metasae_jax.training.trainer import RunConfig, train_and_save
    if spec.get("distributed"):
      sharding.initialize_distributed(**spec["distributed"])
    run = RunConfig(**spec["run"])
    metrics = train_and_save(TrainConfig(**spec["train"]), run)
    print(f"done: {run.out_dir}  " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
  elif spec["stage"] == "evaluate":
    # Only evaluation needs scipy/matplotlib-heavy modules; import them when asked.
    from metasae_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    report = evaluate.evaluate_run(evaluate.EvalConfig(**spec["evaluate"]))
    print(evaluate.markdown(report))
  else:
    raise UserError(f"unknown stage {spec['stage']!r} in the point spec; expected one of {STAGES}.")


def main(argv: list) -> int:
  workers.die_with_parent()  # before the first write: a sweep killed with SIGKILL takes its workers along
  if len(argv) != 2:
    print(f"usage: python -m {__spec__.name if __spec__ else 'run_point'} SPEC.json", file=sys.stderr)
    return 2
  try:
    with open(argv[1]) as f:
      run_spec(json.load(f))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Interrupted as e:  # SIGINT/SIGTERM (forwarded by the sweep): the state is saved
    print(str(e), file=sys.stderr)
    return 128 + e.signum
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
