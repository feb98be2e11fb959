"""`make demo`: the smollm2_demo config end to end (export → train joint + solo → evaluate → report).

  python -m experiments.demo [--out_dir runs/demo] [--config.train.width=1152]

Rerunning reuses every finished stage.
"""

import os

from absl import flags
from experiments import cli, cli_flags, configs

F = flags.FLAGS
cli_flags.define_config_file("config", os.path.join(os.path.dirname(configs.__file__), "smollm2_demo.py"),
                             "Config file; override any field with --config.SECTION.NAME=... (docs/configs.md).")
flags.DEFINE_string("out_dir", "runs/demo", "Where the store, the run and the report go.")
cli.deprecated_alias("workdir", "out_dir")
flags.DEFINE_string("llm", "", "Also run autointerp with this LLM (e.g. local:smollm2-135m-gguf); empty skips it.")
flags.DEFINE_bool("dry_run", False, "Print the resolved config (JSON) and exit.")


def main(argv):
  del argv
  if F.dry_run:
    print(F.config.to_json_best_effort(indent=2))
    return
  cli.check_pipeline(F.config, F.out_dir)
  from metasae_jax.workflows.pipeline import run_pipeline  # pylint: disable=g-import-not-at-top  (JAX, torch)
  report = run_pipeline(configs.to_preset(F.config), F.out_dir, llm=F.llm, config=F.config.to_dict())
  print(f"\nreport: {report}\n        {F.out_dir}/report.json and PNG plots in {F.out_dir}/")


if __name__ == "__main__":
  cli.run(main)
