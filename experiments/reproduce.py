"""Reproduce a paper setting (or the demo / tiny preset) end to end, resumable at every stage.

  python -m experiments.reproduce --preset tiny --out_dir runs/tiny
  python -m experiments.reproduce --config experiments/configs/gpt2_large_l20.py:small --out_dir /data/gpt2l \\
      --config.train.width=4608 --llm openai:http://localhost:8000/v1#Qwen2.5-72B

export → train (the config's sweep grid when it has one) → evaluate → autointerp (with --llm) → table.md
in the paper's Table 1 layout next to the paper's own numbers. `--preset NAME` is a shorthand for
`--config experiments/configs/NAME.py` (overrides need --config).
"""

import json

from absl import flags
from experiments import cli, cli_flags, configs
from metasae_jax.core.errors import UserError

F = flags.FLAGS
cli_flags.define_config_file("config", None, "Config file (experiments/configs/NAME.py[:VARIANT]); override "
                             "any field with --config.SECTION.NAME=... (docs/configs.md).")
flags.DEFINE_string("preset", None, f"Shorthand for --config experiments/configs/NAME.py; one of: "
                    f"{', '.join(configs.names())}.")
flags.DEFINE_string("out_dir", None, "Where stores, runs, reports and table.md go.")
cli.deprecated_alias("workdir", "out_dir")
flags.DEFINE_string("llm", "", "LLM for autointerp (local:<id|dir|smollm2-135m-gguf> or openai:<url>#<model>); "
                    "empty skips autointerp.")
flags.DEFINE_bool("estimate", False, "Only print the config's disk and compute estimate (JSON) and exit.")
flags.DEFINE_bool("dry_run", False, "Print the resolved config (JSON) and exit.")


def resolved_config():
  """The config tree from --config (with its overrides) or --preset."""
  if F.config is not None and F.preset:
    raise UserError("pass --config FILE or --preset NAME, not both (--preset NAME is --config "
                    "experiments/configs/NAME.py).")
  if F.config is not None:
    return F.config
  if not F.preset:
    raise UserError(f"--config FILE or --preset NAME is required; presets: {', '.join(configs.names())}.")
  return configs.get_config(F.preset)


def main(argv):
  del argv
  c = resolved_config()
  if F.dry_run:
    print(c.to_json_best_effort(indent=2))
    return
  if F.estimate:
    from metasae_jax.workflows.pipeline import estimate_cost  # pylint: disable=g-import-not-at-top
    print(json.dumps(estimate_cost(configs.to_preset(c)), indent=2))
    return
  if not F.out_dir:
    raise UserError("--out_dir is required: where stores, runs and reports go.")
  cli.check_pipeline(c, F.out_dir)
  from metasae_jax.workflows.pipeline import run_pipeline  # pylint: disable=g-import-not-at-top  (JAX, torch)
  out = run_pipeline(configs.to_preset(c), F.out_dir, llm=F.llm, config=c.to_dict())
  print(f"\nresult: {out}")


if __name__ == "__main__":
  cli.run(main)
