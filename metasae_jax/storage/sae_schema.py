"""What an SAE read from disk must satisfy, whatever format it came from: cfg fields and tensors.

Legend: D = d_model, N = width.
Every reader (our artifacts, SAELens and sparsify folders) ends in `validated`, so nothing downstream sees a
cfg value or a tensor this module did not check: a wrong type, a missing field, a shape that disagrees with
the cfg or a NaN/inf weight is one UserError naming the folder, the field and the fix.
"""

from typing import Any, Optional

import numpy as np

from metasae_jax.core import architectures
from metasae_jax.core.errors import UserError

# cfg.json `activation`: the architecture the SAE was trained as (core/architectures, JAX-free names).
ACTIVATIONS = architectures.names()
# How a loaded SAE decides which latents fire (storage/loaded_sae.py).
FIRINGS = ("threshold", "topk", "batchtopk")
INPUT_NORMS = ("standardize_per_token", "none")
REQUIRED_CFG = ("d_model", "width", "k", "activation", "input_norm")


def fail(path: str, problem: str, fix: str = "Fix cfg.json or re-export the SAE.") -> UserError:
  return UserError(f"SAE {path}: {problem}. {fix}")


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def describe(value: Any) -> str:
  """A short rendering of a bad value for an error line."""
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def int_field(path: str, cfg: dict, key: str, lo: int, hi: Optional[int] = None, where: str = "cfg.json",
              optional: bool = False) -> Optional[int]:
  """cfg[key] as an int in [lo, hi) (hi None: no upper bound); None when optional and absent or null."""
  if key not in cfg or cfg[key] is None:
    if optional:
      return None
    raise fail(path, f"{where} has no {key!r}")
  value = cfg[key]
  if not is_int(value):
    raise fail(path, f"{where} {key} {describe(value)} is not an integer")
  if value < lo or (hi is not None and value >= hi):
    bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
    raise fail(path, f"{where} {key} is {value}; it must be {bound}")
  return value


def k_field(path: str, cfg: dict, width: int, lo: int, where: str = "cfg.json", optional: bool = False,
            width_name: str = "width") -> Optional[int]:
  """cfg["k"]: an integer >= lo and at most the width (k = width keeps every latent: a dense code)."""
  k = int_field(path, cfg, "k", lo, where=where, optional=optional)
  if k is not None and k > width:
    raise fail(path, f"{where} k is {k}, more than its {width_name} {width}")
  return k


def choice_field(path: str, cfg: dict, key: str, choices: tuple, where: str = "cfg.json",
                 default: Optional[str] = None) -> str:
  """cfg[key], one of `choices`; `default` when absent (None: the field is required)."""
  if key not in cfg:
    if default is None:
      raise fail(path, f"{where} has no {key!r}")
    return default
  if cfg[key] not in choices or not isinstance(cfg[key], str):
    raise fail(path, f"{where} {key} {describe(cfg[key])} is not one of {choices}")
  return cfg[key]


def typed_field(path: str, cfg: dict, key: str, kinds: tuple, what: str, where: str = "cfg.json") -> None:
  """An optional field, when present, has one of `kinds` (None allowed when listed)."""
  if key in cfg and not (isinstance(cfg[key], kinds) and not (isinstance(cfg[key], bool) and bool not in kinds)):
    raise fail(path, f"{where} {key} {describe(cfg[key])} is not {what}")


def check_cfg(path: str, cfg: Any) -> None:
  """Our cfg form (any reader's output): every field a tool reads has the right type and range."""
  if not isinstance(cfg, dict):
    raise fail(path, f"cfg.json holds {type(cfg).__name__}, not a JSON object")
  missing = [key for key in REQUIRED_CFG if key not in cfg]
  if missing:
    raise fail(path, f"cfg.json lacks {missing}", "Add them or re-export the SAE.")
  int_field(path, cfg, "d_model", 1)
  width = int_field(path, cfg, "width", 1)
  # k = 0: an SAE that fires by threshold only (SAELens jumprelu/standard); checked against the tensors.
  k_field(path, cfg, width, 0)
  choice_field(path, cfg, "activation", ACTIVATIONS)
  choice_field(path, cfg, "input_norm", INPUT_NORMS)
  int_field(path, cfg, "skip_first_positions", 0, optional=True)
  int_field(path, cfg, "context_len", 1, optional=True)
  int_field(path, cfg, "trained_tokens", 0, optional=True)
  typed_field(path, cfg, "has_threshold", (bool,), "true or false")
  typed_field(path, cfg, "train_config", (dict,), "an object")
  typed_field(path, cfg, "source", (dict, type(None)), "an object")
  source = cfg.get("source") or {}
  int_field(path, source, "layer", 0, where="cfg.json source", optional=True)
  typed_field(path, source, "model", (str, type(None)), "a model name", where="cfg.json source")
  typed_field(path, source, "site", (str, type(None)), "a site name", where="cfg.json source")


def tensor_shapes(cfg: dict) -> dict:
  """The shape every tensor of our form must have, from the cfg."""
  d, n = cfg["d_model"], cfg["width"]
  return {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)}


def check_tensor(path: str, name: str, t: Any, shape: tuple, weights: str, implied: str) -> np.ndarray:
  """One tensor: a float array of `shape` with no NaN/inf (θ may be +inf: a dead latent never fires)."""
  if not isinstance(t, np.ndarray) or not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
    raise fail(path, f"{weights} tensor {name} has dtype {getattr(t, 'dtype', type(t).__name__)}, not a float "
               "type", "Re-export the SAE.")
  if tuple(t.shape) != tuple(shape):
    raise fail(path, f"{weights} tensor {name} has shape {tuple(t.shape)}, but {implied} imply {tuple(shape)}",
               "The weights and cfg.json come from different SAEs; re-export the SAE.")
  t = np.asarray(t, np.float32)
  bad = np.isnan(t) | (np.isneginf(t) if name == "threshold" else ~np.isfinite(t))
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise fail(path, f"{weights} tensor {name} holds {int(bad.sum())} NaN/inf value(s) (first at index "
               f"{first[0] if len(first) == 1 else first})", "The SAE diverged or the file is damaged; "
               "use an earlier checkpoint or re-export it.")
  return t


def validated(path: str, tensors: dict, cfg: dict, weights: str, implied: str = "cfg.json d_model and width"
              ) -> tuple[dict, dict]:
  """(float32 tensors, cfg) once every check passed: cfg fields, tensor names, shapes, finiteness, k vs θ."""
  check_cfg(path, cfg)
  shapes = tensor_shapes(cfg)
  out = {}
  for name, shape in shapes.items():
    if name not in tensors:
      if name == "threshold" and cfg.get("has_threshold") is not True:
        continue
      raise fail(path, f"{weights} has no tensor {name!r}", "Re-export the SAE.")
    out[name] = check_tensor(path, name, tensors[name], shape, weights, implied)
  if architectures.spec(cfg["activation"]).learned_threshold and "threshold" not in out:
    raise fail(path, f"cfg.json says {cfg['activation']}, whose latents fire by a trained threshold, but the "
               "weights hold no threshold", "Re-export the SAE from its run (RUN/joint or RUN/solo).")
  if cfg["k"] == 0 and "threshold" not in out:
    raise fail(path, "cfg.json has k 0 and the weights hold no threshold, so no latent could ever fire",
               "Set k (1 <= k < width) in cfg.json or re-export the SAE.")
  return out, cfg

