"""Evaluates a training run's joint and solo SAEs on held-out activations: report.json, report.md, plots.

python -m experiments.evaluate --run_dir RUN --activations HELDOUT_STORE [--model none]
"""

from absl import flags

from experiments import cli
from metasae_jax.evaluation.config import EvalConfig
from metasae_jax.storage import sae_schema, store

_D = EvalConfig(run_dir="", activations="")

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Run directory with joint/ and solo/ SAE artifacts; "
                               "report.json, report.md, split_candidates.json and PNGs are written here.")
_ACTIVATIONS = flags.DEFINE_string("activations", None,
                                  "Activation store to read; default: the held-out view of the store the run "
                                  "trained on (STORE/heldout).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", _D.num_tokens,
                                   "Evaluation tokens, counted after skipping (0 = the whole store).")
_MODEL = flags.DEFINE_string("model", store.BUILTIN_MODEL,
                             "Model for ΔCE: the built-in model by default (an error if the store was "
                             "exported from another model: pass that one); 'none' skips ΔCE. A store that "
                             "records no model skips ΔCE unless --model is given.")
_FIRING = flags.DEFINE_enum("firing", _D.firing, list(sae_schema.FIRINGS),
                            "threshold: calibrated per-latent θ (calibrated and saved if missing); "
                            "topk: each token's k largest; batchtopk: BatchTopK over each batch.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _D.batch_size, "Tokens per batch.")
_SKIP = flags.DEFINE_integer("skip_first_positions", _D.skip_first_positions,
                             "Leave positions t % context_len < this out of everything (0 = all positions; "
                             "fvu_excl_first is reported either way).")
_CE_CONTEXTS = flags.DEFINE_integer("ce_contexts", _D.ce_contexts,
                                    "Whole contexts used for ΔCE (the reference: 3,200); its SE is reported.")
_CE_BATCH = flags.DEFINE_integer("ce_batch_contexts", _D.ce_batch_contexts,
                                 "Contexts per model forward in ΔCE (the hooked batch).")
_CE_FIRING = flags.DEFINE_enum("ce_firing", _D.ce_firing, ["", "threshold", "batchtopk"],
                               "Firing rule of the SAE spliced in for ΔCE: '' = --firing; batchtopk = "
                               "BatchTopK over each hooked batch, as the reference does.")
_CE_FIRST = flags.DEFINE_bool("ce_include_first_position", _D.ce_include_first_position,
                              "Score the next-token prediction at position 0 too (the reference does).")
_BOOT_REPS = flags.DEFINE_integer("bootstrap_replicates", _D.bootstrap_replicates,
                                  "Block-bootstrap replicates for joint-vs-solo intervals (0 skips).")
_BOOT_BLOCKS = flags.DEFINE_integer("bootstrap_blocks", _D.bootstrap_blocks,
                                    "Blocks of whole contexts resampled by the bootstrap.")
_META_STEPS = flags.DEFINE_integer("meta_fve_steps", _D.meta_fve_steps,
                                   "Training steps of the fresh meta SAE for meta FVE (0 skips).")
_SPLIT_PHI = flags.DEFINE_float("split_phi_threshold", _D.split_phi_threshold,
                                "Cross-φ for a joint latent to share a solo latent's firing.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed (meta SAE init, |φ| sample).")

_ALLOW_TRAIN = flags.DEFINE_bool("allow_train_tokens", False,
                                 "Allow --activations that share tokens with the run's training data.")
flags.mark_flags_as_required(["run_dir"])


def main(argv):
  del argv
  # Everything a user can get wrong is checked before JAX or torch is imported.
  cfgs = cli.run_sae_cfgs(_RUN_DIR.value)
  activations = cli.evaluation_store(_ACTIVATIONS.value, cli.recorded_activations(_RUN_DIR.value),
                                     _ALLOW_TRAIN.value, f"the run in {_RUN_DIR.value}")
  cli.check_store(activations)
  held = cli.check_sae_store(cfgs, activations, _RUN_DIR.value)
  recorded = held.source.get("model")
  model = cli.model_flag(recorded, f"the store {activations}")
  # A store that records no model (synthetic activations) has none to splice into unless one is named.
  model = model if (recorded or _MODEL.present) else ""
  config = EvalConfig(
      run_dir=_RUN_DIR.value,
      activations=activations,
      num_tokens=_NUM_TOKENS.value,
      model=model, firing=_FIRING.value, batch_size=_BATCH_SIZE.value,
      skip_first_positions=_SKIP.value, ce_contexts=_CE_CONTEXTS.value, ce_batch_contexts=_CE_BATCH.value,
      ce_firing=_CE_FIRING.value, ce_include_first_position=_CE_FIRST.value, meta_fve_steps=_META_STEPS.value,
      split_phi_threshold=_SPLIT_PHI.value, bootstrap_replicates=_BOOT_REPS.value,
      bootstrap_blocks=_BOOT_BLOCKS.value, seed=_SEED.value)
  if model and model.lower() != "none" and config.ce_contexts:
    cli.check_model(model, held, runs_on_store=True)
  from metasae_jax.evaluation import evaluate as evaluation  # pylint: disable=g-import-not-at-top  (JAX)
  with cli.writing_into(config.run_dir):
    report = evaluation.evaluate_run(config)
  print(evaluation.markdown(report))


if __name__ == "__main__":
  cli.run(main)
