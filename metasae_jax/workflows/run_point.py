"""One stage of one sweep point in its own process: `python -m metasae_jax.workflows.run_point SPEC.json`.

The sweep writes SPEC.json (`write_spec`) and launches this module, so points
run side by side and a crash stays in its point. The spec holds plain config
fields: {"stage": "train" | "evaluate", "train": TrainConfig, "run": RunConfig,
"evaluate": EvalConfig}.
"""

import dataclasses
import json
import sys
from typing import Optional

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage import atomic
from metasae_jax.training.trainer import RunConfig, train_and_save

STAGES = ("train", "evaluate")


def write_spec(path: str, stage: str, train: Optional[TrainConfig] = None, run: Optional[RunConfig] = None,
               evaluate=None) -> None:
  """Writes the spec of one stage (`evaluate` is an `evaluation.evaluate.EvalConfig`)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}")
  spec = {"stage": stage, "train": train.to_dict() if train else None,
          "run": dataclasses.asdict(run) if run else None,
          "evaluate": dataclasses.asdict(evaluate) if evaluate else None}
  atomic.write_json(path, spec)


def run_spec(spec: dict) -> None:
  """Trains (resuming if interrupted) or evaluates, as the spec says."""
  if spec["stage"] == "train":
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
  if len(argv) != 2:
    print(f"usage: python -m {__spec__.name if __spec__ else 'run_point'} SPEC.json", file=sys.stderr)
    return 2
  try:
    with open(argv[1]) as f:
      run_spec(json.load(f))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
