"""The chunked reader (training/data.py): resumable windowed order, and per-process reads in a real 2-process run.

2 processes x 2 fake CPU devices (jax.distributed over gloo on 127.0.0.1): each process reads only the chunks of
its data streams, the union of both is every chunk once per epoch, and the global batches the two processes
assemble equal the one-process reader's.
"""

import collections
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.storage import store, synthetic
from metasae_jax.training import data
from tests.conftest import REPO

B, SEED, BUFFER = 48, 4, 256


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  p = str(tmp_path_factory.mktemp("reader") / "s")
  synthetic.write_sparse_store(p, 3000, 8, context_len=8, shard_tokens=128, num_features=24)  # 24 chunks, last short
  return p


@pytest.mark.parametrize("streams", [1, 2])
def test_a_reader_started_anywhere_continues_the_same_sequence(path, streams):
  s = store.open_store(path)
  whole = data.BatchSource(s, B, SEED, 1, shuffle_buffer_tokens=BUFFER, streams=streams)
  assert whole.window_chunks == 2 and len(whole.windows_of(0)) > 2
  epoch = whole.batches_per_epoch
  seen = [whole.batch(p) for p in range(2 * epoch + 3)]
  for start in (1, 5, epoch - 1, epoch, 2 * epoch + 1):  # inside a window, across windows, across epochs
    resumed = data.BatchSource(s, B, SEED, 1, shuffle_buffer_tokens=BUFFER, streams=streams)
    for p in range(start, min(start + 3, len(seen))):
      np.testing.assert_array_equal(resumed.batch(p), seen[p])
    resumed.close()
  # Within an epoch no kept token comes twice, and skipped positions never come.
  idx = np.concatenate([whole.global_indices(p) for p in range(epoch)])
  assert len(np.unique(idx)) == len(idx) and not (idx % 8 == 0).any()
  whole.close()


_WORKER = r'''
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from metasae_jax.storage import store
from metasae_jax.training import data
s = store.open_store(sys.argv[3])
reads, read = [], s.read_chunk
s.read_chunk = lambda c: (reads.append(int(c)), read(c))[1]
src = data.BatchSource(s, %(B)d, %(SEED)d, 1, jax.process_index(), jax.process_count(), shuffle_buffer_tokens=%(BUFFER)d)
batch_sharding = NamedSharding(jax.make_mesh((4,), ("data",)), PartitionSpec("data"))
full = []
for p in range(src.batches_per_epoch):
  local = src.batch(p).astype(np.float32)
  full.append(multihost_utils.process_allgather(jax.make_array_from_process_local_data(batch_sharding, local),
                                                tiled=True))
src.close()
if jax.process_index() == 0:
  np.save(sys.argv[4] + ".npy", np.stack(full))
json.dump({"reads": reads, "epoch0": [int(c) for w in src.windows_of(0) for c in w],
           "next": [int(c) for c in src.windows_of(1)[0]], "devices": jax.local_device_count(),
           "batches": src.batches_per_epoch}, open(sys.argv[4] + f".{jax.process_index()}.json", "w"))
''' % {"B": B, "SEED": SEED, "BUFFER": BUFFER}


def test_two_processes_read_disjoint_chunks_and_assemble_the_one_process_batches(path, tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = str(tmp_path / "out")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, f"127.0.0.1:{port}", str(i), path, out], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  for proc in procs:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
  rec = [json.load(open(f"{out}.{i}.json")) for i in (0, 1)]
  assert [r["devices"] for r in rec] == [2, 2]
  s = store.open_store(path)
  mine = [set(r["epoch0"]) for r in rec]
  assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(s.num_chunks))  # every chunk, by one process
  for r in rec:  # each chunk of its epoch read once, plus the next epoch's first window read ahead
    assert collections.Counter(r["reads"]) == collections.Counter(r["epoch0"]) + collections.Counter(r["next"])
  reference = data.BatchSource(s, B, SEED, 1, shuffle_buffer_tokens=BUFFER, streams=2)
  got = np.load(out + ".npy")
  assert len(got) == reference.batches_per_epoch == rec[0]["batches"]
  for p in range(len(got)):
    np.testing.assert_array_equal(got[p], reference.batch(p).astype(np.float32))
