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
    thresholds is refused (BatchTopK is batch-dependent), unless the caller
    accepts the per-token TopK(k) approximation (`allow_approximate`).
  - Per-token TopK SAEs become `architecture="topk"` (exact).
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
import shutil
from typing import Optional

import numpy as np
from safetensors.numpy import save as st_save

from metasae_jax.storage import artifact, atomic, lock
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
# Files that say a directory belongs to something else (run_config.json: a training run; manifest.json: a store).
_OWNED_BY = {"run_config.json": "a training run directory", "manifest.json": "an activation store"}


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
  if cfg["activation"] == "topk":
    arch = {"architecture": "topk", "k": int(cfg["k"]), "rescale_acts_by_decoder_norm": False}
  elif "threshold" in tensors:
    arch = {"architecture": "jumprelu"}
    out["threshold"] = tensors["threshold"]
  elif allow_approximate:
    arch = {"architecture": "topk", "k": int(cfg["k"]), "rescale_acts_by_decoder_norm": False}
    caveats.append(f"BatchTopK exported as per-token TopK(k={cfg['k']}): same mean L0, but which "
                   "latents fire differs from BatchTopK and from calibrated thresholds.")
  else:
    raise UserError("this BatchTopK SAE has no calibrated thresholds, and BatchTopK (batch-dependent) "
                    "has no SAELens equivalent. Run `python -m experiments.evaluate --run_dir RUN "
                    "--activations HELDOUT` first (it calibrates and saves per-latent thresholds, exported "
                    "as a JumpReLU SAE), or pass --allow_approximate to export per-token TopK(k).")
  source = cfg.get("source") or {}
  metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
              "model_name": source.get("model"), "hook_name": _hook_name(source),
              "context_size": cfg.get("context_len"), "metasae": cfg}
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
    raise UserError(f"--out {out_dir} resolves to {real}, which is or holds --run_dir {run_dir}; the export "
                    "would overwrite the run's artifacts. Pick a new --out (nothing was written).")
  if not os.path.exists(real):
    atomic.check_output_dir(out_dir, "--out")
    return
  if not os.path.isdir(real):
    raise UserError(f"--out {out_dir} is a file, not a directory. Pick a new --out (nothing was written).")
  names = set(os.listdir(real))
  for name, what in _OWNED_BY.items():
    if name in names:
      raise UserError(f"--out {out_dir} is {what} ({real}/{name}); an export never writes into one. "
                      "Pick a new --out (nothing was written).")
  if EXPORT_MARKER in names:
    atomic.check_output_dir(out_dir, "--out")
    return  # our own previous export: replacing it is allowed
  foreign = sorted(names - {lock.LOCK_FILE})
  if foreign:
    raise UserError(f"--out {out_dir} holds files export_sae did not write ({', '.join(foreign[:5])}"
                    f"{', ...' if len(foreign) > 5 else ''}). Pick a new or empty --out (nothing was written).")
  atomic.check_output_dir(out_dir, "--out")


def export_run(run_dir: str, out_dir: str, fmt: str, allow_approximate: bool = False) -> dict:
  """Exports the run's joint and solo SAEs to out_dir/joint, out_dir/solo. Returns {name: caveats}."""
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
    return {name: export_sae(os.path.join(run_dir, name), os.path.join(out_dir, name), fmt, allow_approximate)
            for name in present}
  except BaseException:
    if fresh:  # a failed first export (disk full, ...) leaves no half-export behind
      shutil.rmtree(out_dir, ignore_errors=True)
    raise
