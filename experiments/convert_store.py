"""Copies an activation store into a new zarr store (format 2), on local disk, s3:// or gs://.

  python -m experiments.convert_store OLD NEW [--chunk_tokens 4096]

OLD is a format-1 store (manifest.json + .npy shards) or any store; NEW must be new. Rows, tokens, source and
the train / held-out split come over unchanged; every chunk of NEW gets its checksum (docs/storage.md).
"""

from absl import flags

from experiments import cli
from metasae_jax.core.errors import UserError
from metasae_jax.storage import convert, zarr_store

_CHUNK_TOKENS = flags.DEFINE_integer("chunk_tokens", zarr_store.CHUNK_TOKENS,
                                     "Tokens per zarr chunk (rounded down to whole contexts). Shards that are whole "
                                     "multiples of it read in the same chunks as the old store, so training order "
                                     "is unchanged for any shuffle buffer.")


def main(argv):
  if len(argv) != 3:
    raise UserError("usage: python -m experiments.convert_store OLD NEW (two locations: the store to copy and a "
                    "new one).")
  if _CHUNK_TOKENS.value <= 0:
    raise UserError(f"--chunk_tokens must be positive, got {_CHUNK_TOKENS.value}.")
  out = convert.convert(argv[1], argv[2], _CHUNK_TOKENS.value)
  print(f"{out.path}: {out.num_tokens} tokens x d_model {out.d_model} ({out.dtype}) in {out.num_chunks} chunks, "
        f"identity {out.identity()['digest']}")


if __name__ == "__main__":
  cli.run(main)
