"""Format 2 (zarr v3 through TensorStore): round trip, views, damage caught per chunk, the converter, and the same
SAEs trained from a format-1 store and its zarr copy. Object storage: test_object_storage.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage import convert, store, synthetic, zarr_store
from metasae_jax.training import data
from metasae_jax.training.trainer import RunConfig, train_and_save
from tests.conftest import REPO

L = 8  # context length
N = 16384  # tokens: four shards / chunks of 4096


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """A format-1 store with an exporter split and its zarr copy (default chunks: the format-1 reading grid)."""
  root = tmp_path_factory.mktemp("pair")
  acts = synthetic.sparse_activations(N, 16, num_features=48).astype(np.float16)
  tokens = np.arange(N, dtype=np.int32) * 7 % 1000
  old = store.write_store(str(root / "old"), acts, tokens, context_len=L, source={"model": "m", "layer": 1},
                          shard_tokens=4096, fmt="npy")
  store.write_split(old, 0.25)
  convert.convert(old.path, str(root / "new"))
  return {"old": old.path, "new": str(root / "new"), "acts": acts, "tokens": tokens, "root": root}


def test_round_trip_chunks_views_and_identity(pair):
  s = store.open_store(pair["new"], require_tokens=True)
  assert (s.format, s.num_tokens, s.num_chunks, s.dtype) == (store.FORMAT_ZARR, N, 4, "float16")
  np.testing.assert_array_equal(s.read_acts(0, N, None), pair["acts"])
  idx = np.array([N - 1, 0, 4097, 4096, 4095, 5])
  np.testing.assert_array_equal(s.gather_acts(idx, None), pair["acts"][idx])
  np.testing.assert_array_equal(s.gather_tokens(idx), pair["tokens"][idx])
  for c in (0, 3):
    np.testing.assert_array_equal(s.read_chunk(c), pair["acts"][c * 4096:(c + 1) * 4096])
  train, held = store.split_of(pair["new"])
  assert store.token_ranges(held)[1] == store.token_ranges(store.split_of(pair["old"])[1])[1] == [(12288, N)]
  h = store.open_store(held)
  np.testing.assert_array_equal(h.read_acts(0, h.num_tokens, None), pair["acts"][12288:])
  assert store.shared_tokens(train, held) == 0 and store.shared_tokens(pair["new"], held) == 4096
  # The identity is the digest of the recorded checksums: same data, same identity; a view has its own.
  again = store.open_store(pair["new"]).identity()
  assert again == s.identity() and h.identity()["digest"] != again["digest"]
  assert again["checksums_sha256"] == h.identity()["checksums_sha256"]


def test_old_and_converted_stores_give_the_same_batches(pair):
  old, new = store.open_store(pair["old"]), store.open_store(pair["new"])
  np.testing.assert_array_equal(old.chunk_offsets, new.chunk_offsets)  # shards of 4 chunks: the same grid
  for buffer in (1 << 20, 8192):  # the whole store in one window; windows of two chunks
    a = data.BatchSource(old, 64, 5, 1, shuffle_buffer_tokens=buffer)
    b = data.BatchSource(new, 64, 5, 1, shuffle_buffer_tokens=buffer)
    for position in (0, 3, a.batches_per_epoch - 1, a.batches_per_epoch + 2):
      np.testing.assert_array_equal(a.batch(position), b.batch(position))


def _flip_byte(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(40)
    b = f.read(1)
    f.seek(40)
    f.write(bytes([b[0] ^ 0x10]))


def test_a_damaged_chunk_is_one_line_naming_store_and_chunk(pair, tmp_path):
  path = str(tmp_path / "s")
  convert.convert(pair["old"], path, chunk_tokens=128)
  _flip_byte(os.path.join(path, "activations", "c", "3", "0"))
  s = store.open_store(path)
  np.testing.assert_array_equal(s.read_chunk(2), pair["acts"][256:384])  # the others still read
  with pytest.raises(UserError, match=r"chunk 3 of activations \(tokens 384-511\) is damaged") as e:
    s.read_chunk(3)
  assert path in str(e.value) and "\n" not in str(e.value)
  source = data.BatchSource(s, 64, 0)
  position = next(p for p in range(source.batches_per_epoch)
                  if ((source.global_indices(p) >= 384) & (source.global_indices(p) < 512)).any())
  source.batch(position - 1) if position else None  # batches that do not touch chunk 3 read fine
  with pytest.raises(UserError, match="chunk 3 of activations"):
    source.batch(position)


def test_a_chunk_rewritten_after_export_is_caught_by_its_recorded_checksum(pair, tmp_path):
  import tensorstore as ts
  path = str(tmp_path / "s")
  convert.convert(pair["old"], path, chunk_tokens=128)
  s = store.open_store(path)
  ident = s.identity()
  # A valid chunk (its crc32c codec is happy) with other data, written through zarr: only the record can tell.
  arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, "activations/")}},
                open=True, write=True).result()
  arr[640:768].write(np.zeros((128, 16), np.float16)).result()
  with pytest.raises(UserError, match=r"chunk 5 of activations \(tokens 640-767\) does not match the checksum"):
    s.read_chunk(5)
  assert store.open_store(path).identity() == ident  # the record is unchanged; the data is not


def test_converter_binary_and_its_refusals(pair, tmp_path):
  def run(*argv):
    return subprocess.run([sys.executable, "-m", "experiments.convert_store", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  out = str(tmp_path / "z")
  ok = run(pair["old"], out, "--chunk_tokens=256")
  assert ok.returncode == 0, ok.stderr
  s = store.open_store(out)
  assert s.num_chunks == N // 256 and json.load(open(os.path.join(out, "zarr.json")))["attributes"]["chunk_tokens"] == 256
  np.testing.assert_array_equal(s.read_acts(0, N, None), pair["acts"])
  for argv, needle in (((pair["old"], out), "already holds files"), ((pair["old"] + "-nope", str(tmp_path / "y")),
                                                                      "does not exist"), ((pair["old"],), "usage")):
    bad = run(*argv)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and needle in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "y")


def test_same_saes_from_the_old_format_and_its_zarr_copy(pair, tmp_path):
  config = TrainConfig(d_model=16, width=48, k=4, meta_width=6, meta_k=2, batch_size=64, n_primary_steps=2,
                       n_meta_steps=1, seed=1)
  weights = []
  for name in ("old", "new"):
    run = RunConfig(activations=store.split_of(pair[name])[0], out_dir=str(tmp_path / name), num_tokens=8 * 64,
                    shuffle_buffer_tokens=4096, checkpoint_every_steps=4, progress=False, curves=False)
    train_and_save(config, run)
    weights.append({sub: open(tmp_path / name / sub / "sae.safetensors", "rb").read()
                    for sub in ("joint", "solo", "joint/meta")})
  assert weights[0] == weights[1]
  recorded = json.load(open(tmp_path / "new" / "run_config.json"))["data"]
  assert recorded["shuffle_buffer_tokens"] == 4096 and recorded["data_streams"] == 1
