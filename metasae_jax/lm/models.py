"""Target language models (PyTorch): loading, their decoder blocks, and truncated residual capture.

Legend: B = contexts in a batch, C = context length (tokens), D = d_model.
transformers >= 5 has no Flax models, so the model runs in PyTorch and only
its activations cross over to JAX (through the activation store).
"""

import dataclasses
import os
import socket
import urllib.parse
from typing import Any

import torch

from metasae_jax.core.errors import UserError
from metasae_jax.lm import model_files

# Names, files and checks that need no torch live in model_files (binaries use them before importing torch).
DEFAULT_MODEL = model_files.DEFAULT_MODEL
DEFAULT_PACKAGE = model_files.DEFAULT_PACKAGE
DEFAULT_GGUF = model_files.DEFAULT_GGUF
SITES = model_files.SITES
check_site = model_files.check_site

# Where common architectures keep their list of transformer blocks.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi, OLMo (inside *ForCausalLM)
    "model.language_model.layers",  # Gemma 3 / multimodal wrappers
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-Neo, GPT-J, Bloom, Falcon
    "transformer.blocks",  # MPT
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "layers",  # a bare base model
    "h",  # a bare GPT-2 base model
)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A causal LM in eval mode with its tokenizer."""
  model: Any
  """The `transformers` PreTrainedModel (PyTorch, eval mode)."""
  tokenizer: Any
  """Its tokenizer (a `PreTrainedTokenizerBase`)."""
  name: str
  """Id for manifests and cfg.json: the default's name, an absolute local path, or an HF id."""
  d_model: int
  """Width of the residual stream."""
  num_layers: int
  """Number of transformer blocks."""


class _StopForward(Exception):
  """Raised by a hook to end the forward pass once the wanted activation is captured."""


def _resolve(name: str) -> tuple:
  """(path, from_pretrained kwargs, id for manifests) of the default, a local directory or an HF id."""
  if name == DEFAULT_MODEL:
    return model_files.default_dir(), {"gguf_file": DEFAULT_GGUF}, DEFAULT_MODEL
  model_files.check_local(name)
  if os.path.exists(name):
    return name, {}, os.path.abspath(name)
  try:
    return name, _hub_kwargs(name), name
  except (OSError, ValueError) as e:
    raise _unknown(name, e) from e


def _unknown(name: str, e: Exception) -> UserError:
  where = "local directory" if os.path.isdir(name) else "model"
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return UserError(f"unknown --model {name!r}: could not load it as a {where} ({first}). Pass the "
                   f"built-in default {DEFAULT_MODEL!r}, a local directory holding config.json, "
                   "weights and a tokenizer, or an HF model id with internet access "
                   "(models cannot be downloaded offline).")


def load_tokenizer(name: str) -> Any:
  """Only the tokenizer of `name` (seconds; the default's weights take longer to dequantise)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path, kwargs, _ = _resolve(name)
  try:
    return AutoTokenizer.from_pretrained(path, **kwargs)
  except (OSError, ValueError, KeyError) as e:
    raise _unknown(name, e) from e


def load_model(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
  """Loads `name`: the built-in default, a local model directory, or an HF model id."""
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=g-import-not-at-top
  path, kwargs, ident = _resolve(name)
  try:
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
  except (OSError, ValueError, KeyError) as e:
    raise _unknown(name, e) from e
  model.eval()
  layers = decoder_layers(model)
  d_model = int(model.config.get_text_config().hidden_size)
  return LoadedModel(model=model, tokenizer=tokenizer, name=ident, d_model=d_model,
                     num_layers=len(layers))


def _hub_kwargs(name: str) -> dict:
  """Uses the local HF cache if it holds `name`; else checks the hub resolves before trying it.

  Offline, huggingface_hub retries for ~50 s before failing; a failed DNS lookup is instant.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
    return {"local_files_only": True}
  host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
  try:
    socket.getaddrinfo(host, 443)
  except OSError as e:
    raise OSError(f"{name} is not in the local HF cache and {host} is unreachable ({e})") from e
  return {}


def decoder_layers(model: torch.nn.Module) -> list:
  """The model's transformer blocks in order (Llama, GPT-2, Gemma, NeoX, OPT, MPT, ...)."""
  for path in _LAYER_PATHS:
    obj = model
    for attr in path.split("."):
      obj = getattr(obj, attr, None)
      if obj is None:
        break
    if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
      return list(obj)
  # Unknown architecture: the ModuleList as long as the configured depth.
  config = getattr(model, "config", None)
  depth = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
  for _, module in model.named_modules():
    if isinstance(module, torch.nn.ModuleList) and depth and len(module) == depth:
      return list(module)
  raise UserError(f"cannot find the transformer blocks of {type(model).__name__}. Use a "
                  "Llama/GPT-2/Gemma/NeoX/OPT-style model or extend models._LAYER_PATHS.")


def _first_tensor(value: Any) -> torch.Tensor:
  return value if isinstance(value, torch.Tensor) else value[0]


def _capture_and_stop_hook(block: torch.nn.Module, site: str, sink: list):
  """Registers a hook on `block` that appends its input/output residual to `sink` and stops the forward."""
  if site == "resid_pre":
    def pre_hook(_, args, kwargs):
      sink.append(args[0] if args else kwargs["hidden_states"])
      raise _StopForward
    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)

  def post_hook(_, __, output):
    sink.append(_first_tensor(output))
    raise _StopForward
  return block.register_forward_hook(post_hook)


def capture_residual(model: torch.nn.Module, input_ids_BxC: torch.Tensor, layer: int,
                     site: str) -> torch.Tensor:
  """The residual stream [B, C, D] at `site` of block `layer`; blocks after it never run."""
  layers = decoder_layers(model)
  check_site(layer, site, len(layers))
  sink: list = []
  handle = _capture_and_stop_hook(layers[layer], site, sink)
  try:
    with torch.inference_mode():
      model(input_ids=input_ids_BxC, use_cache=False)
  except _StopForward:
    pass
  finally:
    handle.remove()
  if not sink:
    raise RuntimeError(f"block {layer} of {type(model).__name__} never ran")
  return sink[0]
