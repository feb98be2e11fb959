"""Malformed SAE folders of every format, generated from valid ones: each is one UserError naming the field, or
loads as the same SAE.

For every cfg.json field (and the fields of its nested objects) of a valid folder: missing, wrong type, NaN,
inf, negative; for every tensor: missing, wrong shape (a row short, flattened, an extra axis), NaN, inf. The
expected outcome comes from this file's own table of which fields each format requires, which it reads, and
which no tool interprets, not from the validator.
Legend: B = tokens, D = d_model, N = width.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from metasae_jax.core.errors import UserError
from metasae_jax.storage import artifact, interop
from metasae_jax.storage.loaded_sae import load_sae

D, N, K, B = 8, 32, 4, 16

# Per format: fields whose absence is an error, fields a tool reads (a wrong type is an error, absence is
# fine), fields no tool interprets (anything loads the same SAE), and what an absent field defaults to
# when that default changes the SAE (checked on the loaded SAE instead of equal outputs).
OURS = {"required": {"d_model", "width", "k", "activation", "input_norm"},
        "read": {"source", "source.layer", "source.model", "source.site", "skip_first_positions", "context_len",
                 "trained_tokens", "train_config", "has_threshold"},
        "free": {"dtype", "library", "role", "source.corpus", "source.text_field", "source.context_len",
                 "train_config.*"},
        "defaults": {}}
SAELENS = {"required": {"d_in", "d_sae"},
           "read": {"architecture", "normalize_activations", "reshape_activations", "apply_b_dec_to_input",
                    "rescale_acts_by_decoder_norm", "k", "metadata", "metadata.model_name", "metadata.hook_name",
                    "metadata.context_size"},
           "free": {"dtype", "device", "metadata.*"},
           # SAELens' own defaults: no architecture is a standard (ReLU) SAE, no normalisation is none.
           "defaults": {"architecture": lambda s: s.cfg["saelens_cfg"].get("architecture") is None
                        and np.all(s.threshold_N == 0),
                        "normalize_activations": lambda s: s.input_norm == "none"}}
SPARSIFY = {"required": {"d_in", "k"},
            "read": {"num_latents", "expansion_factor", "activation", "skip_connection", "transcode"},
            "free": {"normalize_decoder", "multi_topk", "metasae", "metasae.*"},
            # num_latents absent: sparsify's rule, expansion_factor x d_in (= N here) — the same SAE.
            "defaults": {}}


def _params(seed):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(N, D)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  return {"W_enc": (rng.normal(size=(D, N)) * 0.5).astype(np.float32), "b_enc": rng.normal(size=N).astype(np.float32)
          * 0.1, "W_dec": w_dec, "b_dec": rng.normal(size=D).astype(np.float32) * 0.1}


def _ours(path, activation="batchtopk", input_norm="standardize_per_token", threshold=True):
  cfg = artifact.sae_cfg("joint", {"k": K, "activation": activation, "batch_size": 64}, 4096,
                         source={"model": "m", "layer": 3, "site": "resid_pre", "corpus": "c", "text_field": "text",
                                 "context_len": 8}, skip_first_positions=0, context_len=8)
  cfg["input_norm"] = input_norm
  theta = np.abs(np.random.default_rng(1).normal(size=N)).astype(np.float32) * 0.3 if threshold else None
  artifact.save_sae(str(path), _params(0), cfg, theta)
  return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("valid")
  saelens_jump = str(root / "saelens_jumprelu")
  interop.export_sae(_ours(root / "a"), saelens_jump, "saelens")
  saelens_topk = str(root / "saelens_topk")
  interop.export_sae(_ours(root / "b", activation="topk", threshold=False), saelens_topk, "saelens")
  sparsify = str(root / "sparsify")
  interop.export_sae(_ours(root / "c", activation="topk", input_norm="none", threshold=False), sparsify, "sparsify")
  return {"ours": (_ours(root / "ours"), artifact.WEIGHTS, OURS),
          "saelens_jumprelu": (saelens_jump, interop.SAELENS_WEIGHTS, SAELENS),
          "saelens_topk": (saelens_topk, interop.SAELENS_WEIGHTS, dict(SAELENS, required={"d_in", "d_sae", "k"})),
          "sparsify": (sparsify, artifact.WEIGHTS, SPARSIFY)}


def _x():
  rng = np.random.default_rng(7)
  return (rng.normal(size=(B, D)) * 2 + rng.normal(size=(B, 1))).astype(np.float32)


def _outputs(sae):
  return np.asarray(sae.reconstruct(_x()))


_MISSING = object()


def _cfg_mutations(cfg):
  """(field, label, new value or _MISSING) for every top-level field and every field of a nested object."""
  fields = [(key, None) for key in cfg] + [(f"{key}.{sub}", key) for key, value in cfg.items()
                                           if isinstance(value, dict) for sub in value]
  for field, parent in fields:
    value = cfg[parent][field.split(".", 1)[1]] if parent else cfg[field]
    yield field, "missing", _MISSING
    yield field, "wrong type", 12345 if isinstance(value, str) else "abc"
    yield field, "a list", [1, 2]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      yield field, "NaN", math.nan
      yield field, "inf", math.inf
      yield field, "negative", -3


def _with(cfg, field, value):
  out = json.loads(json.dumps(cfg))
  holder, key = (out[field.split(".")[0]], field.split(".", 1)[1]) if "." in field else (out, field)
  if value is _MISSING:
    del holder[key]
  else:
    holder[key] = value
  return out


def _role(spec, field):
  for role in ("required", "read", "free"):
    names = spec[role]
    if field in names or any(n.endswith(".*") and field.startswith(n[:-1]) for n in names):
      return role
  return "read"  # a field this table does not know is treated strictly: its values must be checked


def _tensor_mutations(tensors):
  for name, t in tensors.items():
    yield name, "missing", None
    yield name, "a row short", t[:-1]
    yield name, "flattened" if t.ndim > 1 else "extra axis", t.reshape(-1) if t.ndim > 1 else t[None]
    for label, bad in (("NaN", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
      flat = t.astype(np.float32).copy().reshape(-1)
      flat[min(3, flat.size - 1)] = bad
      yield name, label, flat.reshape(t.shape)


def _copy(src, dst):
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  return dst


def _check(case, path, outcome, expect, field, reference, default_ok):
  """A problem string, or None when the outcome is what the table expects."""
  kind, value = outcome
  if expect == "error":
    if kind != "error":
      return f"{case}: loaded, expected a UserError naming {field!r}"
    if path not in value or field.split(".")[-1] not in value:
      return f"{case}: the error does not name the folder and {field!r}: {value}"
    return None
  if kind == "error":
    return f"{case}: expected to load, got: {value}"
  if default_ok is not None:
    return None if default_ok(value) else f"{case}: loaded without the documented default"
  if not np.allclose(_outputs(value), reference, rtol=1e-5, atol=1e-5):
    return f"{case}: loaded a different SAE"
  return None


def _load(path):
  try:
    return "loaded", load_sae(path)
  except UserError as e:
    return "error", str(e)


@pytest.mark.parametrize("name", ["ours", "saelens_jumprelu", "saelens_topk", "sparsify"])
def test_every_malformed_cfg_field_and_tensor_is_refused_or_harmless(name, folders, tmp_path):
  src, weights, spec = folders[name]
  reference = _outputs(load_sae(src))
  with open(os.path.join(src, "cfg.json")) as f:
    cfg = json.load(f)
  problems, cases = [], 0
  for field, label, value in _cfg_mutations(cfg):
    path = _copy(src, str(tmp_path / "case"))
    with open(os.path.join(path, "cfg.json"), "w") as f:
      json.dump(_with(cfg, field, value), f)  # NaN/inf written as JSON's NaN/Infinity, which json.load reads
    role = _role(spec, field)
    numeric_bad = label in ("NaN", "inf", "negative") and role != "free"
    if label == "missing":
      expect = "error" if role == "required" else "load"
    else:
      expect = "load" if role == "free" else "error"
    if label == "negative" and not numeric_bad:
      expect = "load"
    default_ok = spec["defaults"].get(field) if label == "missing" else None
    problem = _check(f"{name} cfg.json {field} {label}", path, _load(path), expect, field, reference, default_ok)
    cases += 1
    if problem:
      problems.append(problem)
  tensors = load_file(os.path.join(src, weights))
  optional = {"b_enc", "encoder.bias"}  # an SAE without encoder bias is a valid SAE (zeros)
  for tensor, label, value in _tensor_mutations(tensors):
    path = _copy(src, str(tmp_path / "case"))
    mutated = {k: v for k, v in tensors.items() if k != tensor}
    if value is not None:
      mutated[tensor] = np.ascontiguousarray(value)
    save_file(mutated, os.path.join(path, weights))
    # θ = +inf is a dead latent that never fires: allowed, and it changes the SAE, so only its loading is checked.
    if tensor == "threshold" and label == "inf":
      outcome = _load(path)
      if outcome[0] != "loaded":
        problems.append(f"{name} threshold +inf: expected to load, got {outcome[1]}")
      continue
    expect = "load" if (label == "missing" and tensor in optional) else "error"
    if label == "missing" and tensor in optional:
      outcome = _load(path)
      if outcome[0] != "loaded":
        problems.append(f"{name} {tensor} missing: expected to load with zeros, got {outcome[1]}")
      continue
    problem = _check(f"{name} {weights} {tensor} {label}", path, _load(path), expect, tensor, reference, None)
    cases += 1
    if problem:
      problems.append(problem)
  assert cases > 40 and not problems, "\n".join(problems)


def test_k_larger_than_width_and_nan_weights_are_refused_by_name(folders, tmp_path):
  """The issue's cases, each by its own message: k 1000 for width 32, d_model 'abc', NaN W_dec, SAELens W_dec
  [37, 8], a 1-D W_enc and k 'abc'."""
  src = folders["ours"][0]
  cfg = json.load(open(os.path.join(src, "cfg.json")))
  for field, value, message in (("k", 1000, "k is 1000, more than its width 32"),
                                ("d_model", "abc", "d_model 'abc' is not an integer")):
    path = _copy(src, str(tmp_path / field))
    json.dump(dict(cfg, **{field: value}), open(os.path.join(path, "cfg.json"), "w"))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
      load_sae(path)
  path = _copy(src, str(tmp_path / "nan"))
  t = load_file(os.path.join(path, artifact.WEIGHTS))
  t["W_dec"][5, 2] = np.nan
  save_file(t, os.path.join(path, artifact.WEIGHTS))
  with pytest.raises(UserError, match=r"W_dec holds 1 NaN/inf value\(s\) \(first at index \(5, 2\)\)"):
    load_sae(path)
  sl = folders["saelens_topk"][0]
  for tensor, value, message in (("W_dec", np.zeros((37, D), np.float32), r"W_dec has shape \(37, 8\)"),
                                 ("W_enc", np.zeros(D * N, np.float32), r"W_enc has shape \(256,\)"),
                                 ("b_dec", np.zeros(D + 1, np.float32), r"b_dec has shape \(9,\)")):
    path = _copy(sl, str(tmp_path / tensor))
    t = load_file(os.path.join(path, interop.SAELENS_WEIGHTS))
    t[tensor] = value
    save_file(t, os.path.join(path, interop.SAELENS_WEIGHTS))
    with pytest.raises(UserError, match=message):
      load_sae(path)
  path = _copy(sl, str(tmp_path / "k"))
  sl_cfg = json.load(open(os.path.join(path, "cfg.json")))
  json.dump(dict(sl_cfg, k="abc"), open(os.path.join(path, "cfg.json"), "w"))
  with pytest.raises(UserError, match="k 'abc' is not an integer"):
    load_sae(path)
