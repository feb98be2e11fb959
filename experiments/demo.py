"""`make demo`: the smollm2_demo preset end to end (export → train joint + solo → evaluate → report).

  python -m experiments.demo [--workdir runs/demo]

Rerunning reuses every finished stage.
"""

from absl import flags

from experiments import cli, configs
from metasae_jax.workflows.pipeline import run_pipeline

F = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the store, the run and the report go.")
flags.DEFINE_string("llm", "", "Also run autointerp with this LLM (e.g. local:smollm2-135m-gguf); empty skips it.")


def main(argv):
  del argv
  report = run_pipeline(configs.get("smollm2_demo"), F.workdir, llm=F.llm)
  print(f"\nreport: {report}\n        {F.workdir}/report.json and PNG plots in {F.workdir}/")


if __name__ == "__main__":
  cli.run(main)
