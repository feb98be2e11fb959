"""Which latents fire on a prompt: per token, the top latents of a trained SAE and their activations.

  python -m experiments.inspect --run_dir runs/demo --sae joint --prompt "def main():"
"""

import json
import os

from absl import flags

from experiments import cli
from metasae_jax.lm import model_files
from metasae_jax.storage import artifact, sae_schema

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Run directory holding joint/ and solo/ SAE artifacts.")
flags.DEFINE_enum("sae", "joint", list(artifact.SAE_NAMES), "Which SAE of the run.")
flags.DEFINE_enum("firing", None, list(sae_schema.FIRINGS),
                  "Firing rule; default: calibrated thresholds when the SAE has them, else per-token top-k.")
flags.DEFINE_string("prompt", None, "Text to run through the model.")
flags.DEFINE_string("model", model_files.DEFAULT_MODEL, "Model to run: the built-in model by default (an error if "
                    "the SAE was trained on another model's activations: pass that one).")
flags.DEFINE_integer("top", 5, "Latents shown per token.")
flags.DEFINE_integer("skip_first_positions", None, "Positions marked as skipped; default: the ones the SAE was "
                     "trained without (its cfg.json's skip_first_positions).")
flags.mark_flags_as_required(["run_dir", "prompt"])


def explanations(run_dir: str, which: str) -> dict:
  """Latent id → explanation from autointerp, when it has run."""
  path = os.path.join(run_dir, "autointerp", "scores.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    scores = json.load(f)
  return {int(l["id"]): l.get("explanation", "") for l in scores.get(which, {}).get("latents", [])}


def main(argv):
  del argv
  # The SAE's cfg and the model's blocks are checked before torch or JAX is imported.
  cfg = cli.hooked_sae(F.run_dir, F.sae)
  source = cfg["source"]
  if F.top < 1:
    raise cli.UserError(f"--top must be >= 1, got {F.top}.")
  model = cli.model_flag(source.get("model"), f"the SAE in {F.run_dir}/{F.sae}")
  cli.check_model(model, layer=source["layer"], site=source["site"])
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from metasae_jax import load_sae  # pylint: disable=g-import-not-at-top  (JAX)
  from metasae_jax.lm import models  # pylint: disable=g-import-not-at-top  (torch)
  sae = load_sae(os.path.join(F.run_dir, F.sae))
  loaded = models.load_model(model)
  with torch.inference_mode():
    ids = loaded.tokenizer(F.prompt, return_tensors="pt").input_ids
    resid = models.capture_residual(loaded.model, ids, int(source["layer"]), source["site"])[0]
  firing = sae.firing_rule(F.firing)
  print(f"{F.sae} SAE, firing rule {firing!r}")
  acts = np.asarray(sae.encode(resid.float().numpy(), firing))
  notes = explanations(F.run_dir, F.sae)
  skip = F.skip_first_positions if F.skip_first_positions is not None else int(cfg.get("skip_first_positions") or 0)
  for pos, tok in enumerate(ids[0].tolist()):
    text = loaded.tokenizer.decode([tok])
    if pos < skip:
      print(f"{pos:4d} {text!r:>16}  (skipped: the SAE never saw it)")
      continue
    top = np.argsort(-acts[pos])[:F.top]
    cells = [f"{i}:{acts[pos, i]:.2f}" + (f" [{notes[i]}]" if i in notes else "")
             for i in top if acts[pos, i] > 0]
    print(f"{pos:4d} {text!r:>16}  " + ("  ".join(cells) or "(nothing fires)"))


if __name__ == "__main__":
  cli.run(main)
