"""Reading the command line: absl flags, config files and `--config.*` overrides, each mistake one line.

`cli.run` parses every binary's flags through `parse`: an unknown or malformed flag, a config file that
does not load, an override that names no field and a NaN/inf number all end in one `error: ...` line and
exit status 1, before the binary imports anything heavy. Config-file flags are defined through
`define_config_file`, which also catches a default config that fails at definition time.
"""

import difflib
import math
import os
import re
import sys
import traceback
import types

from absl import flags
from ml_collections import config_dict, config_flags

# Config-file flags (name -> default path) defined through define_config_file.
_CONFIG_FLAGS: dict = {}


def fail(message: str) -> None:
  """Prints `error: message` and exits with status 1."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def define_config_file(name: str, default, help_string: str, **kwargs):
  """`config_flags.DEFINE_config_file`; a config that fails to load here (the default file is loaded when the
  flag is defined, with any `--NAME.field` overrides) is one error line instead of an import traceback."""
  _CONFIG_FLAGS[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (a config file can raise anything)
    fail(config_error(name, sys.argv, e))


def _config_arg(name: str, argv: list):
  """The value given to `--name` on the command line, or None."""
  for i, arg in enumerate(argv):
    match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if match:
      if match.group(1) is not None:
        return match.group(2)
      return argv[i + 1] if i + 1 < len(argv) else ""
  return None


def _overrides(name: str, argv: list) -> list:
  """The field paths of `--name.a.b=...` overrides, in order."""
  out = []
  for arg in argv:
    match = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      out.append(match.group(1))
  return out


def _where_in(path: str, tb) -> str:
  """' (FILE line N)' for the deepest frame of `tb` inside the config file, else ''."""
  frames = [f for f in traceback.extract_tb(tb) if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f" ({path} line {frames[-1].lineno})" if frames else ""


def load_config(spec: str):
  """Runs a config file `PATH[:ARG]` as ml_collections does: its `get_config(ARG)` (no ARG: `get_config()`)."""
  path, *args = spec.split(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such config file {path}")
  module = types.ModuleType("config_file")
  module.__file__ = path
  with open(path) as f:
    source = f.read()
  exec(compile(source, path, "exec"), module.__dict__)  # pylint: disable=exec-used
  if not callable(getattr(module, "get_config", None)):
    raise AttributeError(f"{path} defines no get_config()")
  return module.get_config(*args)


def _missing_field(config, path: str):
  """(the part of `path` that exists, the missing key, the keys there) for an override naming no field; else None."""
  node, walked = config, []
  for key in path.split("."):
    keys = list(node.keys()) if isinstance(node, (config_dict.ConfigDict, dict)) else None
    if keys is None:
      return ".".join(walked), key, []
    if key not in keys:
      return ".".join(walked), key, sorted(keys)
    node = node[key]
    walked.append(key)
  return None


def config_error(name: str, argv: list, error: BaseException) -> str:
  """One line for a config flag that failed to load or override: which file or field, what is wrong, the fix."""
  spec = _config_arg(name, argv)
  spec = spec if spec is not None else _CONFIG_FLAGS.get(name)
  if spec is None:
    return f"--{name}: {_one_line(error)}"
  path = spec.split(":", 1)[0]
  try:
    config = load_config(spec)
  except FileNotFoundError:
    return (f"--{name} {spec}: no such config file. Pass a config file, e.g. experiments/configs/"
            "smollm2_demo.py (docs/configs.md lists them).")
  except Exception as e:  # pylint: disable=broad-except
    return (f"--{name} {spec}: the config file fails to load: {type(e).__name__}: {_one_line(e).rstrip('.')}"
            f"{_where_in(path, e.__traceback__)}. Fix the file or pass another --{name}.")
  for override in _overrides(name, argv):
    missing = _missing_field(config, override)
    if missing is None:
      continue
    parent, key, keys = missing
    where = f"{name}.{parent}" if parent else name
    if not keys:
      return f"--{name}.{override}: {where} is a value, not a section with fields. Override {where} itself."
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean --{where}.{close[0]}?" if close else f" Its fields: {', '.join(keys)}."
    return (f"--{name}.{override}: the config has no field {key!r} in {where}.{hint} (--dry_run prints "
            "every field.)")
  return f"--{name}: {_one_line(error)}"


def _flag_error(error: flags.Error) -> str:
  message = _one_line(error)
  if not message.endswith((".", "?")):
    message += "."
  return f"{message} See --help for the flags and their values."


def _non_finite_floats(node, prefix: str):
  """(path, value) of every NaN/inf float in a config tree."""
  if isinstance(node, (config_dict.ConfigDict, dict)):
    for key in node.keys():
      yield from _non_finite_floats(node[key], f"{prefix}.{key}")
  elif isinstance(node, (list, tuple)):
    for i, item in enumerate(node):
      yield from _non_finite_floats(item, f"{prefix}[{i}]")
  elif isinstance(node, float) and not math.isfinite(node):
    yield prefix, node


def check_finite(flag_values=flags.FLAGS) -> None:
  """Every float a flag or a config field holds is finite: NaN/inf from the command line is one error line."""
  for name in sorted(flag_values):
    value = flag_values[name].value
    if name in _CONFIG_FLAGS:
      for path, bad in _non_finite_floats(value, f"--{name}"):
        fail(f"{path} is {bad}, not a finite number. Pass a finite value (in the config file or as an override).")
      continue
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
      if isinstance(item, float) and not math.isfinite(item):
        fail(f"--{name} is {item}, not a finite number. Pass a finite value.")


def parse(argv: list) -> list:
  """absl's flag parsing, with every mistake one `error:` line (exit 1); returns the remaining arguments."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (flags.Error, or whatever a config file raises)
    for name in _CONFIG_FLAGS:
      problem = config_error(name, argv, e)
      if not problem.startswith(f"--{name}: "):
        fail(problem)
    if isinstance(e, flags.Error):
      fail(_flag_error(e))
    fail(f"the command line could not be read: {type(e).__name__}: {_one_line(e)}")
  for name in _CONFIG_FLAGS:
    if name not in flags.FLAGS:
      continue
    try:
      value = flags.FLAGS[name].value
      if value is not None:
        value.keys()  # a config that failed to load raises on first access
    except (IOError, OSError) as e:
      fail(config_error(name, argv, e))
  check_finite()
  return rest
