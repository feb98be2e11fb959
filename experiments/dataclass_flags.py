"""Flags generated from config dataclasses: one flag per field, so each hyperparameter has one default.

`define_from(TrainConfig, skip=("d_model",))` defines `--NAME` for every other field, with the field's docstring
and its default as the help text; the flag's own default is None ("the config's value"), so the dataclass stays the
only place a default is written. Types follow the annotation: bool, int, float, str (an enum when choices are
given), tuples as comma lists (`--matryoshka_widths 32,128,512`). JAX-free: flags are checked before JAX loads.
"""

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Optional

from absl import flags

from metasae_jax.core import architectures
from metasae_jax.core import config as train_config
from metasae_jax.training import tracking

# Fields whose values are a closed set: their flags are enums listing it (the dataclass still validates).
CHOICES = {
    ("TrainConfig", "architecture"): architectures.names(),
    ("TrainConfig", "penalty_grad"): train_config.PENALTY_GRADS,
    ("TrainConfig", "compute_dtype"): train_config.COMPUTE_DTYPES,
    ("TrainConfig", "algorithm"): train_config.ALGORITHMS,
    ("RunConfig", "wandb_mode"): tracking.WANDB_MODES,
}

# The flags defined below belong to the binary that calls define_from (its --help lists them), not to this module.
flags.disclaim_key_flags()


def field_docs(cls) -> dict:
  """name -> the docstring under each field of dataclass `cls` (read from its source with `ast`), one line."""
  tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
  body = tree.body[0].body
  docs = {}
  for node, after in zip(body, body[1:]):
    if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
      docs[node.target.id] = " ".join(after.value.value.split())
  return docs


def field_default(field: dataclasses.Field):
  """The field's default (dataclasses.MISSING when it has none)."""
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return dataclasses.MISSING


def _kind(field: dataclasses.Field, hints: dict):
  """The field's base type (bool, int, float, str or tuple) and, for tuples, the type of the elements."""
  hint = hints.get(field.name, field.type)
  if typing.get_origin(hint) is typing.Union:  # Optional[X]
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  origin = typing.get_origin(hint) or hint
  if origin in (tuple, list):
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    default = field_default(field)
    element = args[0] if args else (type(default[0]) if default else int)
    return tuple, element
  return origin, None


class TupleParser(flags.ListParser):
  """A comma list parsed into a tuple of `element` values (`32,128,512` -> (32, 128, 512))."""

  def __init__(self, element: type):
    super().__init__()
    self.element = element

  def parse(self, argument):
    items = super().parse(argument) if isinstance(argument, str) else list(argument)
    try:
      return tuple(self.element(x) for x in items if str(x).strip() != "")
    except ValueError:
      kind = {int: "whole numbers", float: "numbers"}.get(self.element, self.element.__name__)
      raise ValueError(f"give comma-separated {kind}, e.g. 32,128,512") from None

  def flag_type(self):
    return f"comma-separated list of {self.element.__name__}"


def _show(value) -> str:
  if isinstance(value, tuple):
    return ",".join(map(str, value)) if value else "empty"
  if isinstance(value, str):
    return repr(value) if value == "" else value
  return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def help_text(cls, name: str, default=dataclasses.MISSING, docs: Optional[dict] = None) -> str:
  """The field's docstring, ending with its default (`default` for a field without one in the dataclass)."""
  docs = field_docs(cls) if docs is None else docs
  text = docs.get(name, name.replace("_", " ")).rstrip()
  if default is not dataclasses.MISSING:
    text += f"{'' if text.endswith('.') else '.'} Default: {_show(default)}."
  return text


def define_from(cls, *, skip=(), defaults: Optional[dict] = None, choices: Optional[dict] = None,
                rename: Optional[dict] = None, flag_values=flags.FLAGS) -> dict:
  """Defines `--NAME` (default None = the config's value) for every field of dataclass `cls` not in `skip`.

  `defaults` names defaults that live outside the dataclass (a field without one, e.g. TrainConfig.width from
  the config file) for the help text only; `choices` adds to CHOICES; `rename` maps a field to a flag name of
  another spelling (the exporter's batch_size is --contexts_per_batch). The flags belong to the calling module
  (its --help lists them). Returns {flag name: field name}.
  """
  docs, hints = field_docs(cls), typing.get_type_hints(cls)
  defaults = defaults or {}
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    default = defaults.get(field.name, field_default(field))
    text = help_text(cls, field.name, default, docs)
    kind, element = _kind(field, hints)
    options = (choices or {}).get(field.name) or CHOICES.get((cls.__name__, field.name))
    name = (rename or {}).get(field.name, field.name)
    common = dict(flag_values=flag_values)
    if kind is bool:
      flags.DEFINE_bool(name, None, text, **common)
    elif options:
      flags.DEFINE_enum(name, None, list(options), text, **common)
    elif kind is int:
      flags.DEFINE_integer(name, None, text, **common)
    elif kind is float:
      flags.DEFINE_float(name, None, text, **common)
    elif kind is tuple:
      flags.DEFINE(TupleParser(element), name, None, text, serializer=flags.CsvListSerializer(","), **common)
    elif kind is str:
      flags.DEFINE_string(name, None, text, **common)
    else:
      raise TypeError(f"{cls.__name__}.{field.name}: no flag type for {field.type!r}")
    out[name] = field.name
  return out


def given(defined: dict, flag_values=flags.FLAGS) -> dict:
  """field name -> value of each flag of `defined` (define_from's {flag: field}) given on the command line."""
  return {field: flag_values[name].value for name, field in defined.items()
          if name in flag_values and flag_values[name].present and flag_values[name].value is not None}


def as_argv(values: dict) -> list:
  """`--NAME=VALUE` arguments that give these generated flags these values (a child process's command line)."""
  out = []
  for name, value in values.items():
    if isinstance(value, bool):
      out.append(f"--{'' if value else 'no'}{name}")
    elif isinstance(value, (tuple, list)):
      out.append(f"--{name}={','.join(map(str, value))}")
    else:
      out.append(f"--{name}={value}")
  return out
