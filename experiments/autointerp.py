"""Explains and scores matched joint/solo latents of a training run with an LLM (two fuzzing scorers + detection).

  python -m experiments.autointerp --run_dir RUN --activations STORE --num_latents 16 \
      [--llm local:smollm2-135m-gguf | --llm_base_url http://127.0.0.1:8000/v1 --llm_model MODEL \
       --concurrency 16 [--llm_api_key_env OPENAI_API_KEY]]

Writes RUN/autointerp/{scores.json, report.md, paired_differences.png, explanations.md};
answers are cached in RUN/autointerp/cache/ as they arrive, so rerunning the same
command (also after an interruption) sends no request twice. See docs/autointerp.md.
"""

import json

from absl import flags

from experiments import cli, dataclass_flags
from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.lm import model_files
from metasae_jax.storage.artifact import SAE_NAMES

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Training run directory with joint/ and solo/ SAEs.")
_ACTIVATIONS = flags.DEFINE_string("activations", None,
                                  "Activation store to read; default: the held-out view of the store the run "
                                  "trained on (STORE/heldout).")
# Every other AutointerpConfig field is a flag generated from the dataclass (help: its docstring); the encoding
# batch defaults to the run's training batch (BatchTopK selects over it).
CONFIG_FLAGS = dataclass_flags.define_from(
    AutointerpConfig, skip=("run_dir", "activations"),
    defaults={"batch_size": f"the run's, else {AutointerpConfig.batch_size}"})
_ALLOW_TRAIN = flags.DEFINE_bool("allow_train_tokens", False,
                                 "Allow --activations that share tokens with the run's training data.")
flags.mark_flags_as_required(["run_dir"])


def main(argv):
  del argv
  cfgs = cli.run_sae_cfgs(_RUN_DIR.value, need=2)
  values = dict(cli.trained_with(_RUN_DIR.value, cfgs, ("batch_size",)), **dataclass_flags.given(CONFIG_FLAGS))
  config = AutointerpConfig(
      run_dir=_RUN_DIR.value,
      activations=cli.evaluation_store(_ACTIVATIONS.value, cli.recorded_activations(_RUN_DIR.value),
                                       _ALLOW_TRAIN.value, f"the run in {_RUN_DIR.value}"),
      **values)
  # The run, the store, the tokenizer's vocabulary and a local LLM's files are checked before JAX is imported.
  cli.check_store(config.activations)
  held = cli.check_sae_store(cfgs, config.activations, config.run_dir, require_tokens=True)
  if config.tokenizer or held.source.get("model"):
    cli.check_model(config.tokenizer or held.source["model"], held)
  if config.is_local:
    model_files.check_local(config.llm_spec.partition(":")[2])
  from metasae_jax.autointerp.pipeline import run_autointerp  # pylint: disable=g-import-not-at-top  (JAX)
  from metasae_jax.autointerp.report import METRICS  # pylint: disable=g-import-not-at-top
  with cli.writing_into(config.run_dir):
    scores = run_autointerp(config)
  summary = {name: {m: scores[name][m] for m in METRICS} for name in SAE_NAMES}
  summary["paired"] = {m: {k: v for k, v in scores["paired"][m].items() if k != "differences"}
                       for m in METRICS}
  summary["seconds"] = scores["seconds"]
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  cli.run(main)
