"""Steer the model with one SAE latent and print clean vs steered greedy continuations.

  python -m experiments.steer --run_dir runs/demo --sae joint --latent 12 --alpha 8 --prompt "The"
"""

import os

from absl import flags

from experiments import cli
from metasae_jax import load_sae
from metasae_jax.lm import models, steering
from metasae_jax.core.errors import UserError
from metasae_jax.storage import artifact, loaded_sae

F = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Run directory holding joint/ and solo/ SAE artifacts.")
flags.DEFINE_enum("sae", "joint", list(artifact.SAE_NAMES), "Which SAE of the run.")
flags.DEFINE_enum("firing", None, list(loaded_sae.FIRINGS),
                  "Firing rule; default: calibrated thresholds when the SAE has them, else per-token top-k.")
flags.DEFINE_integer("latent", None, "Latent index to steer with.")
flags.DEFINE_enum("mode", "add", list(steering.MODES),
                  "add: residual += alpha * w_i; clamp: set the latent to --alpha; ablate: set it to 0.")
flags.DEFINE_float("alpha", 8.0, "Strength (add) or clamped activation (clamp).")
flags.DEFINE_string("prompt", None, "Prompt to continue.")
flags.DEFINE_integer("max_new_tokens", 30, "Tokens to generate (greedy).")
flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to run: the built-in model by default (an error if "
                    "the SAE was trained on another model's activations: pass that one).")
flags.mark_flags_as_required(["run_dir", "latent", "prompt"])


def main(argv):
  del argv
  sae = load_sae(os.path.join(F.run_dir, F.sae))
  source = sae.cfg.get("source", {})
  if "layer" not in source or "site" not in source:
    raise UserError(f"{F.run_dir}/{F.sae}/cfg.json has no source.layer/site to hook.")
  loaded = models.load_model(cli.model_flag(source.get("model"), f"the SAE in {F.run_dir}/{F.sae}"))
  edit = steering.Edit(F.latent, F.mode, F.alpha)
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
