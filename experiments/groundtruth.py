"""Ground-truth atomicity benchmark: synthetic data with known features; joint MetaSAE vs solo BatchTopK SAEs over
λ₂ × seeds, and a solo Matryoshka BatchTopK SAE per seed.

  python -m experiments.groundtruth --out_dir runs/gt            # five scenarios, 3 seeds, minutes
  python -m experiments.groundtruth --out_dir runs/gt4 --scale 4 --seeds 5
  python -m experiments.groundtruth --out_dir runs/gth --scenarios hierarchy \\
      --scenario_params hierarchy.p_group=0.2,hierarchy.group_size=4 --config.train.sigma_sq=3

Hyperparameters come from the config file (--config, default experiments/configs/groundtruth.py: the
published study's small-scale choices); `--config.train.FIELD=...` / `--config.study.FIELD=...` override any
field, and the short flags below override the file (a short flag and a --config override of the same field
that disagree are an error, as in `train`). Writes report.json, report.md and plots/ into --out_dir
(definitions: docs/groundtruth.md). Rerunning the same command resumes; a directory holding a study with
other settings is refused.
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import cli, cli_flags, dataclass_flags
from experiments.configs import groundtruth as gt_preset
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.workflows.groundtruth import scenarios
from metasae_jax.workflows.groundtruth.config import PER_ARM

F = flags.FLAGS
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "groundtruth.py")
cli_flags.define_config_file("config", CONFIG, "Study config file (train and study sections); override a field "
                             "with --config.train.NAME=... or --config.study.NAME=....")
flags.DEFINE_string("out_dir", None, "Study directory to create or resume.")
flags.DEFINE_string("scenarios", ",".join(scenarios.KINDS), "Comma-separated scenarios to run.")
flags.DEFINE_string("scenario_params", "", "Generator overrides, name.field=value,... "
                    "(fields: d_model, num_features, p_fire, mag_low, mag_high, noise, num_groups, group_size, "
                    "p_group, p_conditional, p_alone).")
# Short flags: unset means the config file's value (each has one default, there).
_FROM = " Default: the config file's."
# study section
flags.DEFINE_integer("scale", None, "Multiplies widths, feature counts and steps of the defaults." + _FROM)
flags.DEFINE_string("lambda2", None, "Comma-separated penalty weights; 0 is the identical-training control." + _FROM)
flags.DEFINE_integer("seeds", None, "Seeds per (scenario, λ₂) point." + _FROM)
flags.DEFINE_integer("steps", None, "Training steps per SAE; 0 = 1500 * scale." + _FROM)
flags.DEFINE_string("matryoshka_fractions", None, "The matryoshka arm's nested prefix widths as comma-separated "
                    "fractions of the width (the full width is added); 'none' skips the arm." + _FROM)
flags.DEFINE_integer("train_tokens", None, "Tokens in each scenario's training store." + _FROM)
flags.DEFINE_integer("heldout_tokens", None, "Tokens in each scenario's held-out store (scores)." + _FROM)
flags.DEFINE_integer("data_seed", None, "Seed of the synthetic data." + _FROM)
# train section: one flag per TrainConfig field the study does not set per arm (PER_ARM: d_model, lambda2, seed,
# ...), generated from the dataclass; unset = the config file's value. --lambda2 above is the study's list.
TRAIN_FLAGS = dataclass_flags.define_from(
    TrainConfig, skip=PER_ARM, defaults=dict(
        {name: f"{value} (the default config file's)" for name, value in gt_preset.CHOICES.items()},
        width="0 = 64 * scale (the default config file's)"))
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flag_as_required("out_dir")

STUDY_FLAGS = ("scale", "seeds", "steps", "train_tokens", "heldout_tokens", "data_seed")


def _floats(text: str, name: str) -> tuple:
  try:
    return tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise UserError(f"--{name} must be comma-separated numbers, got {text!r}.") from None


def study_config():
  """The StudyConfig from the config file, its --config.* overrides and the short flags (JAX-free)."""
  from metasae_jax.workflows.groundtruth.config import StudyConfig  # pylint: disable=g-import-not-at-top
  kw = gt_preset.study_kwargs(F.config)
  given = config_flags.get_override_values(F["config"])

  def put(section: str, field: str, flag: str, value):
    """A short flag's value, unless a --config override of the same field says otherwise (as `train` does)."""
    key = f"{section}.{field}"
    if key in given and (tuple(given[key]) if isinstance(value, tuple) else given[key]) != value:
      raise UserError(f"--{flag}={F[flag].value} and --config.{key}={given[key]} disagree; pass one of them.")
    (kw["train"] if section == "train" else kw)[field] = value

  for name in STUDY_FLAGS:
    if F[name].value is not None:
      put("study", name, name, F[name].value)
  for field, value in dataclass_flags.given(TRAIN_FLAGS).items():
    put("train", field, field, value)
  if F.lambda2 is not None:
    put("study", "lambda2s", "lambda2", _floats(F.lambda2, "lambda2"))
  if F.matryoshka_fractions is not None:
    none = F.matryoshka_fractions.strip().lower() in ("none", "")
    put("study", "matryoshka_fractions", "matryoshka_fractions",
        () if none else _floats(F.matryoshka_fractions, "matryoshka_fractions"))
  scale = kw.get("scale", 1)
  chosen = scenarios.select([s.strip() for s in F.scenarios.split(",") if s.strip()], scale, F.scenario_params)
  return StudyConfig(out_dir=F.out_dir, scenarios=chosen, **kw)


def main(argv):
  del argv
  cli.check_out_dir(F.out_dir)
  config = study_config()  # every mistake in the settings is one line here, before JAX loads
  from metasae_jax.workflows.groundtruth import study  # pylint: disable=g-import-not-at-top  (JAX)
  report = study.run_study(config, progress=F.progress)
  for name, s in report["scenarios"].items():
    mat = f"; {s['matryoshka']['verdict']} (vs solo)" if s.get("matryoshka") else ""
    print(f"{name}: {s['verdict']}{mat}")
  print(f"wrote {F.out_dir}/report.md, report.json, plots/")


if __name__ == "__main__":
  cli.run(main)
