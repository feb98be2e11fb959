"""Experiment config files (`get_config(variant)` -> ConfigDict, see base.py); `get(name)` gives a pipeline Preset.

A config file is what `--config experiments/configs/NAME.py[:VARIANT]` loads; `--preset NAME` is its shorthand.
"""

import importlib
import pkgutil

from metasae_jax.core.errors import UserError

# Modules here that are not pipeline experiments (groundtruth.py is the ground-truth study's preset).
_NOT_PRESETS = ("base", "default", "groundtruth")


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_PRESETS)


def path(name: str) -> str:
  """The config file of a preset name (what `--preset NAME` loads)."""
  if name not in names():
    raise UserError(f"unknown --preset {name!r}; choose one of {', '.join(names())}.")
  return importlib.import_module(f"{__name__}.{name}").__file__


def get_config(name: str, variant: str = ""):
  path(name)
  return importlib.import_module(f"{__name__}.{name}").get_config(variant)


def train_config(name: str, variant: str = "", **overrides):
  """The preset's TrainConfig: its train section at its d_model, with `overrides` (TrainConfig fields)."""
  from metasae_jax.core.config import TrainConfig  # pylint: disable=g-import-not-at-top
  c = get_config(name, variant)
  return TrainConfig(d_model=c.d_model, **dict(c.train.to_dict(), **overrides))


def to_preset(c):
  """The pipeline's Preset from a config tree."""
  from metasae_jax.workflows.pipeline import Preset  # pylint: disable=g-import-not-at-top
  grid = c.get("grid")
  return Preset(name=c.name, description=c.description, export=c.export.to_dict(), heldout_shards=c.heldout_shards,
                train=c.train.to_dict(), num_tokens=c.run.num_tokens,
                checkpoint_every_steps=c.run.checkpoint_every_steps, log_every_steps=c.run.log_every_steps,
                grid=None if grid is None else {k: tuple(v) for k, v in grid.items()}, eval=c.eval.to_dict(),
                autointerp=c.autointerp.to_dict(), paper=c.paper.to_dict(), d_model=c.d_model,
                model_params=c.model_params, matryoshka_fractions=tuple(c.get("matryoshka_fractions", ())))


def get(name: str, variant: str = ""):
  """The pipeline Preset of a preset name."""
  return to_preset(get_config(name, variant))
