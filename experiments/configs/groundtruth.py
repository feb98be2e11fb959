"""The ground-truth study's preset: the published small-scale study (experiments/groundtruth.py loads it).

  train   every TrainConfig field the study's arms share (TrainConfig's defaults, then the choices below);
          width 0 means 64 * study.scale
  study   every StudyConfig field except out_dir, scenarios (flags) and train, at StudyConfig's defaults

Override any field with `--config.train.k=5` or `--config.study.seeds=5`; the binary's short flags (`--k 5`)
still work and win over the file. Not a `reproduce` preset (configs.names() leaves it out).
"""

import dataclasses

from ml_collections import config_dict

from metasae_jax.core.config import TrainConfig
from metasae_jax.workflows.groundtruth.config import PER_ARM, StudyConfig

# The published study's choices: small enough for minutes on 2 CPU cores (docs/groundtruth.md, "Defaults").
CHOICES = dict(
    k=3,  # the default scenarios fire 2.9-3.6 true features per token
    meta_k=2,  # the paper's 8 needs a wider meta SAE than round(64 · 1800 / 20480) = 6
    batch_size=256,
    lr=1e-3,  # higher than the paper's 3e-4 so that the small study converges in minutes
    aux_k=32,  # the paper's 512 exceeds these widths
)


def _defaults(cls, skip) -> dict:
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in skip and f.default is not dataclasses.MISSING}


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"the ground-truth config has no variants, got {variant!r}")
  c = config_dict.ConfigDict()
  c.train = dict(_defaults(TrainConfig, PER_ARM), width=0, **CHOICES)
  c.study = _defaults(StudyConfig, ("out_dir", "scenarios"))
  return c


def study_kwargs(c) -> dict:
  """StudyConfig keyword arguments (all but out_dir and scenarios) from a config tree."""
  return dict(train=c.train.to_dict(), **c.study.to_dict())
