"""The config tree every config file returns (`get_config`), with every TrainConfig/RunConfig field present.

  name, description, d_model, model_params    what the experiment is (d_model / params: cost estimates only)
  export          every ExportConfig field except out_dir / heldout_fraction / progress; used by reproduce / demo
  heldout_shards  the pipeline's held-out tail of the exported store, in shards
  train           every TrainConfig field except d_model (taken from the store)
  run             RunConfig fields except activations / out_dir (flags)
  grid            None, or lambda2 / sigma_sq / seeds tuples for a sweep
  eval            every EvalConfig field except run_dir / activations; batch_size and skip_first_positions
                  default to the train / run sections' (evaluate as trained)
  autointerp      AutointerpConfig fields used when an --llm is given
  paper           the paper's numbers for table.md
  matryoshka_fractions   the matryoshka arm's prefixes as fractions of train.width (() = no arm; the Preset's
                  default)

Overrides reach any of these from the command line: `--config.train.width=4608 --config.run.num_tokens=0`.
"""

import dataclasses

from ml_collections import config_dict

from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.core.config import TrainConfig
from metasae_jax.evaluation.config import EvalConfig
from metasae_jax.lm.export_config import ExportConfig
from metasae_jax.training.run_config import RunConfig

# TrainConfig.width has no default (it is a choice); the plain `--width` flag's default.
DEFAULT_WIDTH = 4096


def _defaults(cls, skip: tuple) -> dict:
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in skip:
      continue
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
  return out


def train_defaults() -> dict:
  return dict(_defaults(TrainConfig, ("d_model",)), width=DEFAULT_WIDTH)


def run_defaults() -> dict:
  return _defaults(RunConfig, ("activations", "out_dir"))


def eval_defaults() -> dict:
  return _defaults(EvalConfig, ("run_dir", "activations"))


def export_defaults() -> dict:
  # heldout_fraction: the pipeline holds out whole shards itself (heldout_shards); progress: a flag of the binary.
  return _defaults(ExportConfig, ("out_dir", "heldout_fraction", "progress"))


def autointerp_defaults() -> dict:
  return _defaults(AutointerpConfig, ("run_dir", "activations", "llm"))  # llm: the --llm flag


def config(*, name: str, description: str, export: dict, heldout_shards: int = 1, train: dict = None,
           run: dict = None, grid: dict = None, eval: dict = None, autointerp: dict = None, paper: dict = None,
           d_model: int = 0, model_params: float = 0.0, matryoshka_fractions: tuple = (),
           **run_fields) -> config_dict.ConfigDict:
  """A complete config: the given sections on top of every field's default. Unknown field names fail here.

  `run_fields` (num_tokens=..., log_every_steps=...) are a shorthand for entries of `run`.
  """
  run = dict(run or {}, **run_fields)
  sections = {"train": (train_defaults(), train), "run": (run_defaults(), run), "eval": (eval_defaults(), eval),
              "autointerp": (autointerp_defaults(), autointerp)}
  c = config_dict.ConfigDict()
  c.name, c.description, c.d_model, c.model_params = name, description, d_model, float(model_params)
  unknown = sorted(set(export) - set(export_defaults()))
  if unknown:
    raise ValueError(f"config {name}: unknown export fields {unknown}; known: {sorted(export_defaults())}")
  c.export = dict(export_defaults(), **export)
  c.heldout_shards = heldout_shards
  for section, (defaults, given) in sections.items():
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
      raise ValueError(f"config {name}: unknown {section} fields {unknown}; known: {sorted(defaults)}")
    c[section] = dict(defaults, **(given or {}))
  # Evaluation batches and skips as the run trained unless the config says otherwise (one value, not two).
  for field, section in (("batch_size", "train"), ("skip_first_positions", "run")):
    if field not in (eval or {}):
      c.eval[field] = c[section].get_ref(field) + 0  # a derived reference: follows, and is overridden alone
  c.grid = config_dict.placeholder(dict) if grid is None else {k: tuple(v) for k, v in grid.items()}
  c.paper = dict(paper or {})
  c.matryoshka_fractions = tuple(float(f) for f in matryoshka_fractions)
  return c


def check_variant(variant: str, known: tuple) -> None:
  """Refuses a `--config=FILE:VARIANT` this file does not define."""
  if variant and variant not in known:
    raise ValueError(f"unknown config variant {variant!r}; this file has {', '.join(known) or 'none'}.")
