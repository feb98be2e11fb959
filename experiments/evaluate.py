"""Evaluates a training run's joint and solo SAEs on held-out activations: report.json, report.md, plots.

python -m experiments.evaluate --run_dir RUN --activations HELDOUT_STORE [--model none]

Every EvalConfig field is a flag (help: the field's docstring). --batch_size and --skip_first_positions default
to the ones the run trained with (its run_config.json, else its SAEs' cfg.json), so BatchTopK firing and the
calibrated thresholds select over the same batches as training.
"""

from absl import flags

from experiments import cli, dataclass_flags
from metasae_jax.evaluation.config import EvalConfig
from metasae_jax.storage import sae_schema, store

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Run directory with joint/ and solo/ SAE artifacts; "
                               "report.json, report.md, split_candidates.json and PNGs are written here.")
_ACTIVATIONS = flags.DEFINE_string("activations", None,
                                  "Activation store to read; default: the held-out view of the store the run "
                                  "trained on (STORE/heldout).")
_MODEL = flags.DEFINE_string("model", store.BUILTIN_MODEL,
                             "Model for ΔCE: the built-in model by default (an error if the store was "
                             "exported from another model: pass that one); 'none' skips ΔCE. A store that "
                             "records no model skips ΔCE unless --model is given.")
# Every other EvalConfig field is a flag generated from the dataclass; the batch size and the skip rule default to
# the run's (BatchTopK firing and θ calibration depend on the batch they select over).
EVAL_FLAGS = dataclass_flags.define_from(
    EvalConfig, skip=("run_dir", "activations", "model"),
    defaults={name: f"the run's, else {getattr(EvalConfig, name)}" for name in cli.TRAINED_WITH},
    choices={"firing": sae_schema.FIRINGS, "ce_firing": ("",) + sae_schema.FIRINGS})
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
  values = dict(cli.trained_with(_RUN_DIR.value, cfgs), **dataclass_flags.given(EVAL_FLAGS))
  config = EvalConfig(run_dir=_RUN_DIR.value, activations=activations, model=model, **values)
  if model and model.lower() != "none" and config.ce_contexts:
    cli.check_model(model, held, runs_on_store=True)
  from metasae_jax.evaluation import evaluate as evaluation  # pylint: disable=g-import-not-at-top  (JAX)
  with cli.writing_into(config.run_dir):
    report = evaluation.evaluate_run(config)
  print(evaluation.markdown(report))


if __name__ == "__main__":
  cli.run(main)
