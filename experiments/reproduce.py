"""Reproduce a paper setting (or the demo / tiny preset) end to end, resumable at every stage.

  python -m experiments.reproduce --preset tiny --workdir runs/tiny
  python -m experiments.reproduce --preset gpt2_large_l20 --workdir /data/gpt2l --llm openai:http://localhost:8000/v1#Qwen2.5-72B

export → train (the preset's sweep grid when it has one) → evaluate → autointerp (with --llm) → table.md
in the paper's Table 1 layout next to the paper's own numbers.
"""

import json

from absl import flags

from experiments import cli, configs
from metasae_jax.core.errors import UserError
from metasae_jax.workflows.pipeline import estimate_cost, run_pipeline

F = flags.FLAGS
flags.DEFINE_string("preset", None, f"One of: {', '.join(configs.names())}.")
flags.DEFINE_string("workdir", None, "Where stores, runs, reports and table.md go.")
flags.DEFINE_string("llm", "", "LLM for autointerp (local:<id|dir|smollm2-135m-gguf> or openai:<url>#<model>); "
                    "empty skips autointerp.")
flags.DEFINE_bool("estimate", False, "Only print the preset's disk and compute estimate (JSON) and exit.")
flags.mark_flags_as_required(["preset"])


def main(argv):
  del argv
  if F.estimate:
    print(json.dumps(estimate_cost(configs.get(F.preset)), indent=2))
    return
  if not F.workdir:
    raise UserError("--workdir is required: where stores, runs and reports go.")
  out = run_pipeline(configs.get(F.preset), F.workdir, llm=F.llm)
  print(f"\nresult: {out}")


if __name__ == "__main__":
  cli.run(main)
