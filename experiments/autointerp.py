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

from experiments import cli
from metasae_jax.autointerp.config import SCORERS, AutointerpConfig
from metasae_jax.lm import model_files
from metasae_jax.storage.artifact import SAE_NAMES

_D = AutointerpConfig(run_dir="", activations="")

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Training run directory with joint/ and solo/ SAEs.")
_ACTIVATIONS = flags.DEFINE_string("activations", None,
                                  "Activation store to read; default: the held-out view of the store the run "
                                  "trained on (STORE/heldout).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", _D.num_tokens,
                                   "Tokens streamed through the SAEs, after skipping; 0 = all.")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", _D.num_latents, "Matched joint/solo pairs to score.")
_LLM = flags.DEFINE_string("llm", _D.llm, "local:<hf id | dir | smollm2-135m-gguf> or "
                           "openai:<base_url>#<model>; --llm_base_url overrides it.")
_BASE_URL = flags.DEFINE_string("llm_base_url", _D.llm_base_url,
                                "OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM).")
_MODEL = flags.DEFINE_string("llm_model", _D.llm_model, "Model name served at --llm_base_url.")
_KEY_ENV = flags.DEFINE_string("llm_api_key_env", _D.llm_api_key_env,
                               "Name of the environment variable holding the API key (never the key).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", _D.concurrency,
                                    "LLM requests in flight; 0 = 8 for HTTP, 1 for the local model.")
_TOKENIZER = flags.DEFINE_string("tokenizer", _D.tokenizer,
                                 "Tokenizer for the store's tokens; default: the store's source model.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed for pair choice, example sampling, random marks.")
_SKIP = flags.DEFINE_integer("skip_first_positions", _D.skip_first_positions,
                             "Leading positions of each context never encoded (attention sink).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _D.batch_size, "Tokens per encoding batch.")
_WINDOW = flags.DEFINE_integer("window", _D.window, "Tokens per example context.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", _D.max_examples,
                                     "Explainer examples per latent; 0 = 40 (HTTP) or 8 (local).")
_NUM_SCORE = flags.DEFINE_integer("num_score", _D.num_score,
                                  "Activating contexts per latent and scorer; 0 = 50 (HTTP) or 5 (local).")
_NUM_NEGATIVE = flags.DEFINE_integer("num_negative", _D.num_negative,
                                     "Non-activating contexts per latent and scorer; 0 = 50 (HTTP) or 5.")
_PER_SCORER = {f"{s}_{kind}": flags.DEFINE_integer(f"{s}_{kind}", 0, f"{s} scorer: {kind} contexts; 0 = "
                                                   f"--{'num_score' if kind == 'activating' else 'num_negative'}.")
               for s in SCORERS for kind in ("activating", "negative")}
_EXPLAIN_TOKENS = flags.DEFINE_integer("explain_max_tokens", _D.explain_max_tokens,
                                       "Generated tokens per explanation.")
_TIMEOUT = flags.DEFINE_float("timeout_s", _D.timeout_s, "HTTP backend: seconds per request attempt.")
_RETRIES = flags.DEFINE_integer("retries", _D.retries, "HTTP backend: retries (client backoff).")
_ALLOW_TRAIN = flags.DEFINE_bool("allow_train_tokens", False,
                                 "Allow --activations that share tokens with the run's training data.")
flags.mark_flags_as_required(["run_dir"])


def main(argv):
  del argv
  cfgs = cli.run_sae_cfgs(_RUN_DIR.value, need=2)
  config = AutointerpConfig(
      run_dir=_RUN_DIR.value,
      activations=cli.evaluation_store(_ACTIVATIONS.value, cli.recorded_activations(_RUN_DIR.value),
                                       _ALLOW_TRAIN.value, f"the run in {_RUN_DIR.value}"),
      num_tokens=_NUM_TOKENS.value,
      num_latents=_NUM_LATENTS.value, llm=_LLM.value, llm_base_url=_BASE_URL.value,
      llm_model=_MODEL.value, llm_api_key_env=_KEY_ENV.value, concurrency=_CONCURRENCY.value,
      tokenizer=_TOKENIZER.value, seed=_SEED.value, skip_first_positions=_SKIP.value,
      batch_size=_BATCH_SIZE.value, window=_WINDOW.value, max_examples=_MAX_EXAMPLES.value,
      num_score=_NUM_SCORE.value, num_negative=_NUM_NEGATIVE.value,
      explain_max_tokens=_EXPLAIN_TOKENS.value, timeout_s=_TIMEOUT.value, retries=_RETRIES.value,
      **{name: flag.value for name, flag in _PER_SCORER.items()})
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
