"""The two GPT-2 large presets: the reference's run script vs the paper's text differ only where they disagree."""

from experiments import configs
from metasae_jax.core.config import TrainConfig, default_meta_width


def test_script_and_text_presets_differ_only_in_the_disputed_values():
  script, text = configs.get("gpt2_large_l20"), configs.get("gpt2_large_l20_text")
  for p in (script, text):
    TrainConfig(d_model=p.d_model, **p.train)  # valid configs
    assert p.train["meta_width"] == default_meta_width(p.train["width"])  # the paper's 1800 at 20480
  changed = {k for k in script.train if script.train[k] != text.train.get(k)}
  assert changed == {"meta_k", "n_primary_steps", "n_meta_steps"}
  # (script, text): meta k 4 vs 8, schedule 100/10 vs 10/5, tokens 200M vs 100M.
  assert (script.train["meta_k"], text.train["meta_k"]) == (4, 8)
  assert (script.train["n_primary_steps"], script.train["n_meta_steps"]) == (100, 10)
  assert (text.train["n_primary_steps"], text.train["n_meta_steps"]) == (10, 5)
  assert (script.num_tokens, text.num_tokens) == (200_000_000, 100_000_000)
  for p in (script, text):  # the export holds the training tokens plus the held-out shards
    assert p.export["num_tokens"] - p.num_tokens == p.heldout_shards * p.export["shard_tokens"]
  assert "run script" in script.description and "text" in text.description
  # The flags' defaults are the text's values.
  fields = {f: TrainConfig.__dataclass_fields__[f].default for f in ("meta_k", "n_primary_steps", "n_meta_steps")}
  assert fields == {k: text.train[k] for k in fields}
