"""Experiment presets: `get(name)` returns a `metasae_jax.workflows.pipeline.Preset`."""

import importlib
import pkgutil

from metasae_jax.core.errors import UserError


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name: str):
  if name not in names():
    raise UserError(f"unknown --preset {name!r}; choose one of {', '.join(names())}.")
  return importlib.import_module(f"{__name__}.{name}").PRESET
