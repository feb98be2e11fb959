"""What the exporter exports and where: one frozen dataclass, validated on construction (no torch import)."""

import dataclasses
import os

from metasae_jax.core.errors import UserError
from metasae_jax.lm import corpus as corpus_lib
from metasae_jax.lm import model_files
from metasae_jax.storage import store as store_lib
from metasae_jax.storage import zarr_store


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What to export and where; `out_dir` is required."""
  out_dir: str
  """Store directory; created if missing, resumed if it holds a store with the same settings."""
  model: str = model_files.DEFAULT_MODEL
  """The built-in default (SmolLM2-135M-Instruct GGUF, offline), a local model directory or an HF id."""
  layer: int = 15
  """Transformer block index, 0-based (15 = the middle of SmolLM2-135M's 30 blocks)."""
  site: str = "resid_pre"
  """`resid_pre` (input of block `layer`, the paper's site) or `resid_post` (its output)."""
  corpus: str = corpus_lib.BUILTIN
  """`builtin` (CPython docs, ~149k SmolLM2 tokens), .txt/.jsonl/.parquet file(s), or an HF dataset id."""
  text_field: str = "text"
  """Field holding the text in .jsonl/.parquet/HF-dataset rows."""
  context_len: int = 128
  """Tokens per context (the paper's 128)."""
  batch_size: int = 8
  """Contexts per forward pass (8 x 128 tokens keeps CPU memory small)."""
  dtype: str = "float16"
  """Stored activation dtype: float16 (half the disk) or float32. The model runs in float32."""
  chunk_tokens: int = zarr_store.CHUNK_TOKENS
  """Tokens per zarr chunk, the unit written, checked and read (rounded down to whole contexts; 4096 x 576
  float16 = 4.7 MB). A resumed store keeps its own."""
  shard_tokens: int = 65536
  """Tokens per shard file of a format-1 store being resumed (new stores are zarr and use chunk_tokens); the
  reproduction pipeline also holds out its last `heldout_shards` x shard_tokens tokens."""
  num_tokens: int = 1 << 20
  """Tokens to export, rounded down to whole contexts; fewer if the corpus runs out first."""
  progress: bool = True
  """Show a tqdm progress bar (tokens/s) on stderr."""
  heldout_fraction: float = 0.05
  """Fraction of the store's whole contexts held out as a fixed tail (views STORE/train, STORE/heldout; rewritten
  after every export or resume); 0 writes no split."""

  def __post_init__(self):
    if not self.out_dir:
      raise UserError("--out_dir is required: the directory to write the activation store to.")
    if self.site not in model_files.SITES:
      raise UserError(f"--site {self.site!r} is not one of {model_files.SITES}.")
    if self.dtype not in store_lib.DTYPES:
      raise UserError(f"--dtype {self.dtype!r} is not one of {store_lib.DTYPES}.")
    if self.layer < 0:
      raise UserError(f"--layer {self.layer} must be >= 0.")
    for name in ("context_len", "batch_size"):
      if getattr(self, name) <= 0:
        raise UserError(f"--{name} {getattr(self, name)} must be positive.")
    if not 0 <= self.heldout_fraction < 1:
      raise UserError(f"--heldout_fraction {self.heldout_fraction} must be in [0, 1) (0 writes no split).")
    for name in ("chunk_tokens", "shard_tokens", "num_tokens"):
      if getattr(self, name) < self.context_len:
        raise UserError(f"--{name} {getattr(self, name)} is below --context_len {self.context_len}; "
                        "pass at least one context's worth of tokens.")

  @property
  def contexts_per_shard(self) -> int:
    return self.shard_tokens // self.context_len

  @property
  def target_tokens(self) -> int:
    return self.num_tokens // self.context_len * self.context_len

  def source(self) -> dict:
    """The manifest's `source`: what identifies the activations (SAE cfg.json copies it)."""
    return {"model": _model_id(self.model), "layer": self.layer, "site": self.site,
            "corpus": corpus_lib.describe(self.corpus), "text_field": self.text_field,
            "context_len": self.context_len}


def _model_id(name: str) -> str:
  return os.path.abspath(name) if name != model_files.DEFAULT_MODEL and os.path.isdir(name) else name


def preflight(config: ExportConfig) -> None:
  """What can be checked before torch is imported or the model loads (which takes ~35 s for the built-in one):
  the model's files, --layer and --site against its blocks, and that the corpus exists and can hold a context."""
  model_files.check_layer(config.model, config.layer, config.site)
  corpus_lib.pieces(config.corpus, config.text_field)  # a missing file or package fails here; nothing is read
  bound = corpus_lib.token_bound(config.corpus)
  if bound is not None and bound < config.context_len:
    raise UserError(f"--corpus {config.corpus} has fewer than --context_len {config.context_len} tokens: no context "
                    f"was exported (its files hold at most {bound}). Use a bigger corpus or a shorter context.")

