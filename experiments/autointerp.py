"""Explains and scores matched joint/solo latents of a training run with an LLM (two fuzzing scorers).

  python -m experiments.autointerp --run_dir RUN --activations STORE --num_latents 16 \
      [--llm local:smollm2-135m-gguf | --llm openai:http://127.0.0.1:8000/v1#MODEL]

Writes RUN/autointerp/scores.json and explanations.md; answers are cached in
RUN/autointerp/cache/, so rerunning the same command issues no LLM requests.
"""

import json

from absl import flags

from experiments import cli
from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.autointerp.pipeline import run_autointerp

_D = AutointerpConfig(run_dir="", activations="")

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Training run directory with joint/ and solo/ SAEs.")
_ACTIVATIONS = flags.DEFINE_string("activations", None,
                                   "Activation store with token shards (held-out text).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", _D.num_tokens,
                                   "Tokens streamed through the SAEs, after skipping; 0 = all.")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", _D.num_latents, "Matched joint/solo pairs to score.")
_LLM = flags.DEFINE_string("llm", _D.llm, "local:<hf id | dir | smollm2-135m-gguf> or "
                           "openai:<base_url>#<model> (key from OPENAI_API_KEY).")
_TOKENIZER = flags.DEFINE_string("tokenizer", _D.tokenizer,
                                 "Tokenizer for the store's tokens; default: the store's source model.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed for pair choice, example sampling, random marks.")
_SKIP = flags.DEFINE_integer("skip_first_positions", _D.skip_first_positions,
                             "Leading positions of each context never encoded (attention sink).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _D.batch_size, "Tokens per encoding batch.")
_WINDOW = flags.DEFINE_integer("window", _D.window, "Tokens per example context.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", _D.max_examples,
                                     "Activating examples shown to the explainer per latent.")
_NUM_SCORE = flags.DEFINE_integer("num_score", _D.num_score,
                                  "Held-out activating examples per latent and scorer.")
_NUM_NEGATIVE = flags.DEFINE_integer("num_negative", _D.num_negative,
                                     "Non-activating contexts per latent and scorer.")
_EXPLAIN_TOKENS = flags.DEFINE_integer("explain_max_tokens", _D.explain_max_tokens,
                                       "Generated tokens per explanation.")
_TIMEOUT = flags.DEFINE_float("timeout_s", _D.timeout_s, "HTTP backend: seconds per request.")
_RETRIES = flags.DEFINE_integer("retries", _D.retries, "HTTP backend: retries with backoff.")
flags.mark_flags_as_required(["run_dir", "activations"])


def main(argv):
  del argv
  config = AutointerpConfig(
      run_dir=_RUN_DIR.value, activations=_ACTIVATIONS.value, num_tokens=_NUM_TOKENS.value,
      num_latents=_NUM_LATENTS.value, llm=_LLM.value, tokenizer=_TOKENIZER.value, seed=_SEED.value,
      skip_first_positions=_SKIP.value, batch_size=_BATCH_SIZE.value, window=_WINDOW.value,
      max_examples=_MAX_EXAMPLES.value, num_score=_NUM_SCORE.value,
      num_negative=_NUM_NEGATIVE.value, explain_max_tokens=_EXPLAIN_TOKENS.value,
      timeout_s=_TIMEOUT.value, retries=_RETRIES.value)
  cli.check_store(config.activations)
  with cli.writing_into(config.run_dir):
    scores = run_autointerp(config)
  summary = {name: {m: scores[name][m] for m in ("fuzz_spearman", "fuzz_balanced_accuracy")}
             for name in ("joint", "solo")}
  summary["paired"] = scores["paired"]
  summary["seconds"] = scores["seconds"]
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  cli.run(main)
