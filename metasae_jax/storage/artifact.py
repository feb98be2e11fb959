"""A finished SAE on disk: `cfg.json` + `sae.safetensors` (SAELens tensor names and shapes).

Legend: D = d_model, N = width.
"""

import hashlib
import json
import os
from typing import Optional

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from metasae_jax.storage import atomic, sae_schema
from metasae_jax.core.errors import UserError

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
# A training run directory holds one artifact per SAE under these names (joint/ also holds meta/).
SAE_NAMES = ("joint", "solo")
REQUIRED_CFG = sae_schema.REQUIRED_CFG


def sae_cfg(which: str, train_config: dict, trained_tokens: int, source: Optional[dict] = None,
            skip_first_positions: int = 0, context_len: int = 1) -> dict:
  """cfg.json of an SAE the trainer publishes (`which`: "joint", "solo" or "meta"; `train_config`: TrainConfig.to_dict()).

  Plain values only, so the format does not depend on the trainer's config types.
  """
  common = {"input_norm": "standardize_per_token", "dtype": "float32", "trained_tokens": trained_tokens,
            "train_config": dict(train_config), "library": "metasae-jax"}
  if which == "meta":
    # The meta SAE's inputs are the joint SAE's decoder rows, not tokens of a model.
    return dict(common, k=train_config["meta_k"], activation="batchtopk", role="meta",
                source={"kind": "decoder_rows", "of": "joint"})
  return dict(common, k=train_config["k"], activation=train_config.get("architecture", train_config.get("activation")), role=which, source=source,
              skip_first_positions=skip_first_positions, context_len=context_len)


def save_sae(path: str, params: dict, cfg: dict, threshold_N: Optional[np.ndarray] = None) -> None:
  """Writes the artifact atomically (weights first, cfg last: a cfg means a complete artifact)."""
  os.makedirs(path, exist_ok=True)
  tensors = {name: np.ascontiguousarray(np.asarray(params[name], np.float32))
             for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
  if threshold_N is not None:
    tensors["threshold"] = np.ascontiguousarray(np.asarray(threshold_N, np.float32))
  d, n = tensors["W_enc"].shape
  cfg = dict(cfg, d_model=int(d), width=int(n), has_threshold=threshold_N is not None)
  missing = [key for key in REQUIRED_CFG if key not in cfg]
  if missing:
    raise ValueError(f"SAE cfg is missing {missing}")
  atomic.write_bytes(os.path.join(path, WEIGHTS), st_save(tensors))
  atomic.write_json(os.path.join(path, CFG), cfg)


def load_sae_files(path: str) -> tuple[dict, dict]:
  """Reads and validates an artifact (`sae_schema.validated`). Returns (tensors as float32 numpy, cfg)."""
  cpath, wpath = os.path.join(path, CFG), os.path.join(path, WEIGHTS)
  for p in (cpath, wpath):
    if not os.path.isfile(p):
      raise UserError(f"SAE artifact {path}: missing {os.path.basename(p)}. "
                      "Point at a directory holding cfg.json and sae.safetensors (e.g. RUN/joint).")
  cfg = read_cfg(path)
  tensors = read_weights(path, WEIGHTS)
  if "b_enc" not in tensors and "W_enc" in tensors and sae_schema.is_int(cfg.get("width")):
    tensors["b_enc"] = np.zeros((cfg["width"],), np.float32)  # an SAE without encoder bias
  return sae_schema.validated(path, tensors, cfg, WEIGHTS)


def read_cfg(path: str) -> dict:
  """An SAE folder's cfg.json as a dict (not yet validated)."""
  try:
    with open(os.path.join(path, CFG), encoding="utf-8") as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"SAE artifact {path}: cfg.json is not valid JSON ({e}). Re-export the SAE.") from None
  except OSError as e:
    raise UserError(f"SAE artifact {path}: cfg.json is unreadable ({e.strerror or e}).") from None
  if not isinstance(cfg, dict):
    raise UserError(f"SAE artifact {path}: cfg.json holds {type(cfg).__name__}, not a JSON object. Re-export "
                    "the SAE.")
  return cfg


def read_weights(path: str, name: str) -> dict:
  """An SAE folder's safetensors file as numpy arrays (not yet validated)."""
  try:
    with open(os.path.join(path, name), "rb") as f:
      return dict(st_load(f.read()))
  except OSError as e:
    raise UserError(f"SAE artifact {path}: {name} is unreadable ({e.strerror or e}).") from None
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise UserError(f"SAE artifact {path}: {name} is unreadable ({e}). Re-export the SAE.") from None


def weights_digest(path: str) -> str:
  """sha256 of an artifact's weights file: what a report or cache records to know it describes these bytes."""
  h = hashlib.sha256()
  with open(os.path.join(path, WEIGHTS), "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()
