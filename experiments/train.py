"""Trains a MetaSAE (joint primary + meta SAE) and the solo baseline in lockstep.

  python -m experiments.train --activations STORE --out_dir runs/x --width 4096 --k 64
  python -m experiments.train --activations STORE --out_dir runs/x \\
      --config experiments/configs/smollm2_demo.py --config.train.lambda2=0.1 --config.train.aux_k=256

Every TrainConfig / RunConfig field is `--config.train.NAME` / `--config.run.NAME` (docs/configs.md) and also a
plain `--NAME` flag generated from the dataclass (help: the field's docstring), which wins over the config. A
store with an exporter split trains on its training view (STORE/train). The resolved config is saved as
OUT_DIR/config.json and printed by --dry_run. Rerunning the same command resumes from the latest checkpoint.
"""

import dataclasses
import json
import os

from absl import flags
from ml_collections import config_flags

from experiments import cli, cli_flags, dataclass_flags
from experiments import configs
from experiments.configs import base
from metasae_jax.core import architectures
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage import artifact, atomic
from metasae_jax.storage.store import read_manifest
from metasae_jax.training import run_config
from metasae_jax.training.run_config import RunConfig

F = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")
CONFIG_JSON = "config.json"

cli_flags.define_config_file(
    "config", DEFAULT_CONFIG, "Config file (experiments/configs/*.py[:VARIANT]); override any field with "
    "--config.train.NAME=... / --config.run.NAME=... Default: every field at its default.", lock_config=True)
flags.DEFINE_string("activations", None, "Activation store: a directory, s3://bucket/prefix or gs://bucket/prefix "
                    "(docs/storage.md); a store with an exporter split trains on its training view STORE/train.")
flags.DEFINE_string("out_dir", None, "Run directory to create or resume.")
flags.DEFINE_bool("dry_run", False, "Print the resolved config (JSON) and exit without training.")

# `--NAME` sets config.SECTION.NAME (and wins over --config.SECTION.NAME): one flag per TrainConfig / RunConfig
# field, generated from the dataclass, whose default is the config's (experiments/configs/base.py: the dataclasses'
# defaults, width 4096).
SHORTHANDS = {**{name: "train" for name in dataclass_flags.define_from(
                  TrainConfig, skip=("d_model",), defaults={"width": base.DEFAULT_WIDTH})},
              **{name: "run" for name in dataclass_flags.define_from(RunConfig, skip=("activations", "out_dir"))}}
cli.deprecated_alias("activation", "architecture")

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("distributed", False,
                  "Multi-host run with auto-detected peers (TPU pod slices, SLURM): run the same command on "
                  "every host. Alternative to --coordinator_address.")
flags.mark_flags_as_required(["activations", "out_dir"])


def resolved_config(**overrides):
  """The --config tree with the shorthand flags given on the command line and `overrides` (train fields) applied."""
  c = F.config.copy_and_resolve_references()
  given = config_flags.get_override_values(F["config"])
  for name, section in SHORTHANDS.items():
    if name in overrides:  # the sweep's grid flags are lists; each point's value comes in `overrides`
      continue
    if name in F and F[name].present and F[name].value is not None:
      value = F[name].value
      if f"{section}.{name}" in given and given[f"{section}.{name}"] != value:
        raise UserError(f"--{name}={F[name].value} and --config.{section}.{name}={given[f'{section}.{name}']} "
                        "disagree; pass one of them.")
      c[section][name] = value
  for name, value in overrides.items():
    c.train[name] = value
  return c


def configs_from_flags(**overrides) -> tuple[TrainConfig, RunConfig]:
  """TrainConfig (every field from the config, shorthand flags and `overrides` winning) and RunConfig."""
  c = resolved_config(**overrides)
  activations = cli.training_view(F.activations, F.out_dir)
  fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"d_model"}
  config = TrainConfig(d_model=read_manifest(activations)["d_model"],
                       **{k: v for k, v in c.train.items() if k in fields})
  run_values = dict(c.run)
  skip_given = F["skip_first_positions"].present or "run.skip_first_positions" in config_flags.get_override_values(
      F["config"])
  if not skip_given:
    # Resuming without the flag keeps the rule the run was started with (the default used to be 1).
    recorded = run_config.recorded_skip_first_positions(F.out_dir)
    if recorded is not None:
      run_values["skip_first_positions"] = recorded
  if not run_values.get("eval_activations") and activations != F.activations:
    # Trained on a split's training view: its held-out view is where validation and the closing lines look
    # (the pipeline's layout keeps it beside the store, where the training view alone does not say).
    run_values["eval_activations"] = cli.split_views(F.activations)[1]
  run = RunConfig(activations=activations, out_dir=F.out_dir, **run_values)
  return config, run


def config_record(config: TrainConfig, run: RunConfig, c) -> dict:
  """What config.json holds: the resolved config tree and the dataclasses it became."""
  return {"config_file": config_flags.get_config_filename(F["config"]), "config": c.to_dict(),
          "train": config.to_dict(), "run": dataclasses.asdict(run)}


def _write_config_json(out_dir: str, record: dict) -> None:
  """Saves the resolved config; an identical file is left alone (a finished run's rerun changes nothing)."""
  path = os.path.join(out_dir, CONFIG_JSON)
  try:
    with open(path) as f:
      if json.load(f) == record:
        return
  except (OSError, ValueError):
    pass
  atomic.write_json(path, record)


# Held-out tokens the closing lines evaluate (a few seconds); position 0 of each context is left out.
SUMMARY_TOKENS = 16384


_FIRING_WORDS = {"batchtopk": "BatchTopK firing as in training", "topk": "TopK firing as in training",
                 "threshold": "firing by the trained thresholds"}


def closing_lines(out_dir: str, metrics: dict, activations: str, eval_activations: str = "",
                  batch_size: int = TrainConfig.batch_size) -> str:
  """What says whether training worked: standardised MSE (the loss) and, on held-out tokens, fvu_typical, with
  raw FVU labelled as raw and the part of it from high-norm tokens (a few sink-like tokens with ~150x the median
  norm carry most of the raw variance, docs/method.md §3.2 and §4; the last batch's raw FVU, all positions, is
  mostly position 0's sink). BatchTopK fires over batches of the run's `batch_size`, as in training."""
  # pylint: disable=g-import-not-at-top  (JAX: imported once training has run)
  from metasae_jax.evaluation import reconstruction
  from metasae_jax.storage import heldout, loaded_sae
  from metasae_jax.storage.store import open_store
  from metasae_jax.training import validation
  heldout_path = validation.heldout_store_path(activations, eval_activations)
  held, firing = {}, "batchtopk"
  if heldout_path:
    store = open_store(heldout_path)
    num = min(SUMMARY_TOKENS, heldout.available_tokens(store, 1))
    for name in artifact.SAE_NAMES:
      if f"{name}/mse" in metrics and num:
        sae = loaded_sae.load_sae(os.path.join(out_dir, name), store.d_model)
        # The architecture's own rule: BatchTopK over the batch (TopK per token; JumpReLU's trained θ).
        firing = architectures.spec(sae.cfg["activation"]).inference_firing
        held[name] = reconstruction.evaluate(sae, store, num, batch_size, skip_first_positions=1, firing=firing,
                                            progress=False)
  lines = [f"done: {out_dir}"]
  for name in artifact.SAE_NAMES:
    if f"{name}/mse" not in metrics:
      continue
    text = f"  {name:5s} mse {metrics[f'{name}/mse']:.4f} (standardised, last batch)  l0 {metrics[f'{name}/l0']:.1f}"
    if name in held:
      r = held[name]
      text += (f"  held-out: fvu_typical {r['fvu_typical']:.4f}  mse {r['mse']:.4f}  raw fvu {r['fvu']:.4f} "
               f"({r['fvu_outliers']:.4f} of it from high-norm tokens)")
    else:
      text += f"  raw fvu {metrics[f'{name}/fvu']:.4f} (last batch, all positions: mostly position 0's sink)"
    lines.append(text)
  if held:
    r = next(iter(held.values()))
    lines.append(f"  held-out: the first {r['num_tokens']} tokens of {heldout_path} past position 0, "
                 f"{_FIRING_WORDS[firing]}; {r['outlier_tokens']} token(s) there have more than "
                 f"{reconstruction.OUTLIER_FACTOR:g}x the median norm and hold {r['outlier_variance_share']:.0%} of "
                 "the raw variance: fvu_typical leaves them out (experiments.evaluate gives the full report)")
  else:
    lines.append("  no held-out store to check on (--eval_activations, or export with --heldout_fraction)")
  return "\n".join(lines)


def main(argv):
  del argv
  # Flags, config, store and output directory are checked before JAX is imported.
  config, run = configs_from_flags()
  cli.check_out_dir(run.out_dir)
  run_config.validate_run(config, run)
  record = config_record(config, run, resolved_config())
  if F.dry_run:
    print(json.dumps(record, indent=2, default=str))
    return
  import jax  # pylint: disable=g-import-not-at-top
  from metasae_jax.training import sharding, trainer  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(F.coordinator_address, F.num_processes, F.process_id, F.distributed)
  metrics = trainer.train_and_save(config, run)
  # One writer on a multi-host run; a finished run's rerun (no metrics) leaves an existing file alone.
  if jax.process_index() == 0 and (metrics or not os.path.exists(os.path.join(run.out_dir, CONFIG_JSON))):
    _write_config_json(run.out_dir, json.loads(json.dumps(record, default=str)))
  if metrics and jax.process_index() == 0:  # the artifacts it checks are written by process 0
    print(closing_lines(F.out_dir, metrics, run.activations, run.eval_activations, config.batch_size))
  elif metrics:
    print(f"done: {F.out_dir} (process {jax.process_index()}; process 0 prints the summary)")
  else:
    print(f"done: {F.out_dir} (already finished; nothing changed)")


if __name__ == "__main__":
  cli.run(main)
