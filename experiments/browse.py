"""Writes RUN/browser/index.html: an offline page to browse the run's joint and solo latents.

  python -m experiments.browse --run_dir RUN --activations STORE [--num_latents 200] [--num_tokens 262144]

The page opens from disk (file://) with no server and no network: data, style and
script are inlined. It shows the run's summary (report.json), a searchable latent
list per SAE, each latent's top and quantile-sampled contexts, an activation
histogram, its autointerp explanation and scores when present, its decoder-matched
partner, and the evaluation's split candidates side by side.
"""

import os

from absl import flags

from experiments import cli, dataclass_flags
from metasae_jax.browser.config import BrowserConfig
from metasae_jax.storage.sae_schema import FIRINGS

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Training run directory with joint/ and solo/ SAEs.")
_ACTIVATIONS = flags.DEFINE_string("activations", None,
                                  "Activation store to read; default: the held-out view of the store the run "
                                  "trained on (STORE/heldout).")
# Every other BrowserConfig field is a flag generated from the dataclass (help: its docstring); the encoding batch
# defaults to the run's training batch (BatchTopK selects over it).
CONFIG_FLAGS = dataclass_flags.define_from(
    BrowserConfig, skip=("run_dir", "activations"),
    defaults={"batch_size": f"the run's, else {BrowserConfig.batch_size}"},
    choices={"firing": ("",) + FIRINGS})
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where index.html goes; default RUN/browser.")
_ALLOW_TRAIN = flags.DEFINE_bool("allow_train_tokens", False,
                                 "Allow --activations that share tokens with the run's training data.")
flags.mark_flags_as_required(["run_dir"])


def main(argv):
  del argv
  # The run, the store, the output directory and the tokenizer's vocabulary are checked before JAX is imported.
  cfgs = cli.run_sae_cfgs(_RUN_DIR.value, need=2)
  values = dict(cli.trained_with(_RUN_DIR.value, cfgs, ("batch_size",)), **dataclass_flags.given(CONFIG_FLAGS))
  config = BrowserConfig(
      run_dir=_RUN_DIR.value,
      activations=cli.evaluation_store(_ACTIVATIONS.value, cli.recorded_activations(_RUN_DIR.value),
                                       _ALLOW_TRAIN.value, f"the run in {_RUN_DIR.value}"),
      **values)
  if _OUT_DIR.value:
    cli.check_out_dir(_OUT_DIR.value)
  cli.check_store(config.activations)
  held = cli.check_sae_store(cfgs, config.activations, config.run_dir, require_tokens=True)
  if config.tokenizer or held.source.get("model"):
    cli.check_model(config.tokenizer or held.source["model"], held)
  from metasae_jax.browser import data as data_lib  # pylint: disable=g-import-not-at-top  (JAX)
  from metasae_jax.browser import page  # pylint: disable=g-import-not-at-top
  with cli.writing_into(config.run_dir):
    data = data_lib.build(config)
    path = page.write(data, _OUT_DIR.value or os.path.join(config.run_dir, "browser"))
  print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB): "
        f"{len(data['saes']['joint']['latents'])} joint and {len(data['saes']['solo']['latents'])} solo "
        f"latents, {len(data['splits'])} split candidates. Open it in a browser: file://{os.path.abspath(path)}")


if __name__ == "__main__":
  cli.run(main)
