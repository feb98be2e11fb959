"""The paper's main setting with the values its text states: meta k 8, schedule 10/5, 100M tokens.

The reference's run script uses meta k 4, 100/10 and 200M tokens instead (preset
gpt2_large_l20); everything else is the same as there.
"""

from experiments.configs import base
from experiments.configs import gpt2_large_l20


def get_config(variant: str = ""):
  base.check_variant(variant, ())
  c = gpt2_large_l20.get_config()
  c.name = "gpt2_large_l20_text"
  c.description = ("GPT-2 large (d 1280), resid_pre of layer 20, FineWeb sample-10BT, context 128, 100M tokens; "
                   "width 20480, k 64, meta 1800 / k 8, B 4096, 10/5 schedule, the paper's 3 x 3 grid. Training "
                   "values as the paper's text states them; its reference code's run script uses meta k 4, "
                   "100/10 and 200M tokens (preset gpt2_large_l20).")
  c.export.num_tokens = 100_000_000 + 2 * 1_048_576
  c.train.meta_k, c.train.n_primary_steps, c.train.n_meta_steps = 8, 10, 5
  c.run.num_tokens = 100_000_000
  return c
