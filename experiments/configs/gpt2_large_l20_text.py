"""The paper's main setting with the values its text states: meta k 8, schedule 10/5, 100M tokens.

The reference's run script uses meta k 4, 100/10 and 200M tokens instead (preset
gpt2_large_l20); everything else is the same as there.
"""

import dataclasses

from experiments.configs import gpt2_large_l20

_BASE = gpt2_large_l20.PRESET

PRESET = dataclasses.replace(
    _BASE,
    name="gpt2_large_l20_text",
    description=("GPT-2 large (d 1280), resid_pre of layer 20, FineWeb sample-10BT, context 128, 100M tokens; "
                 "width 20480, k 64, meta 1800 / k 8, B 4096, 10/5 schedule, the paper's 3 x 3 grid. Training "
                 "values as the paper's text states them; its reference code's run script uses meta k 4, "
                 "100/10 and 200M tokens (preset gpt2_large_l20)."),
    export=dict(_BASE.export, num_tokens=100_000_000 + 2 * 1_048_576),
    train=dict(_BASE.train, meta_k=8, n_primary_steps=10, n_meta_steps=5),
    num_tokens=100_000_000,
)
