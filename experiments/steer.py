"""Steer the model with one SAE latent and print clean vs steered greedy continuations.

  python -m experiments.steer --run_dir runs/demo --sae joint --latent 12 --alpha 8 --prompt "The"
"""

import os

from absl import flags

from experiments import cli
from metasae_jax.lm import edit as edit_lib
from metasae_jax.lm import model_files
from metasae_jax.storage import artifact, sae_schema

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Run directory holding joint/ and solo/ SAE artifacts.")
flags.DEFINE_enum("sae", "joint", list(artifact.SAE_NAMES), "Which SAE of the run.")
flags.DEFINE_enum("firing", None, list(sae_schema.FIRINGS),
                  "Firing rule; default: calibrated thresholds when the SAE has them, else per-token top-k.")
flags.DEFINE_integer("latent", None, "Latent index to steer with.")
flags.DEFINE_enum("mode", "add", list(edit_lib.MODES),
                  "add: residual += alpha * w_i; clamp: set the latent to --alpha; ablate: set it to 0.")
flags.DEFINE_float("alpha", 8.0, "Strength (add) or clamped activation (clamp).")
flags.DEFINE_string("prompt", None, "Prompt to continue.")
flags.DEFINE_integer("max_new_tokens", 30, "Tokens to generate (greedy).")
flags.DEFINE_string("model", model_files.DEFAULT_MODEL, "Model to run: the built-in model by default (an error if "
                    "the SAE was trained on another model's activations: pass that one).")
flags.mark_flags_as_required(["run_dir", "latent", "prompt"])


def main(argv):
  del argv
  # The SAE's cfg, the latent, the prompt and the model's blocks are checked before torch or JAX is imported.
  cfg = cli.hooked_sae(F.run_dir, F.sae)
  source = cfg["source"]
  edit = edit_lib.Edit(F.latent, F.mode, F.alpha)
  edit.check_width(cfg["width"])
  if F.max_new_tokens < 1:
    raise cli.UserError(f"--max_new_tokens must be >= 1, got {F.max_new_tokens}.")
  model = cli.model_flag(source.get("model"), f"the SAE in {F.run_dir}/{F.sae}")
  cli.check_model(model, layer=source["layer"], site=source["site"])
  from metasae_jax import load_sae  # pylint: disable=g-import-not-at-top  (JAX)
  from metasae_jax.lm import models, steering  # pylint: disable=g-import-not-at-top  (torch)
  sae = load_sae(os.path.join(F.run_dir, F.sae))
  loaded = models.load_model(model)
  common = dict(max_new_tokens=F.max_new_tokens)
  clean = steering.generate(loaded.model, loaded.tokenizer, F.prompt, **common)
  steered = steering.generate(loaded.model, loaded.tokenizer, F.prompt, sae=sae, layer=int(source["layer"]),
                              site=source["site"], edits=[edit], firing=F.firing, **common)
  print(f"prompt:  {F.prompt!r}\n")
  print(f"clean:   {clean!r}\n")
  rule = "" if F.mode == "add" else f", firing {sae.firing_rule(F.firing)!r}"
  print(f"steered ({F.mode} latent {F.latent}, {F.alpha}{rule}): {steered!r}")


if __name__ == "__main__":
  cli.run(main)
