"""Stores on object storage, against real servers on 127.0.0.1 started here: moto's S3 server and a GCS emulator.

S3: export killed mid-way and rerun equals an uninterrupted local export byte for byte; `train --activations
s3://...` gives the same SAEs as the local store; a damaged chunk is one line; a second exporter is refused by
the lease. GCS (gcp-storage-emulator): export, train and damage the same way; the lease test is skipped there
because the emulator ignores ifGenerationMatch (docs/storage.md).
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage import lease, location, store
from metasae_jax.training.trainer import RunConfig, train_and_save
from tests.conftest import REPO
from tests.test_crash_safety import big_corpus  # noqa: F401  (fixture)
from tests.test_export import C, model_dir  # noqa: F401  (fixture)

CHUNK = 4 * C
TOKENS = 120 * C
OWN = (".metasae.lock", lease.LEASE_FILE)


@pytest.fixture(scope="module")
def servers():
  """moto (S3) and gcp-storage-emulator (GCS) on 127.0.0.1, each with a bucket; the AWS_* / emulator variables."""
  import boto3
  from gcp_storage_emulator.server import create_server
  from moto.server import ThreadedMotoServer
  s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  s3.start()
  host, port = s3.get_host_and_port()
  gcs = create_server("127.0.0.1", 0, in_memory=True, default_bucket="gbucket")
  gcs.start()
  env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
         "AWS_ENDPOINT_URL": f"http://{host}:{port}",
         "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs._api._httpd.server_port}"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bucket")
  try:
    yield env
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gcs.stop()
    s3.stop()


def _objects(path: str) -> dict:
  """Relative key -> bytes of everything a store holds (local directory or object storage), locks excluded."""
  if not location.is_remote(path):
    out = {}
    for d, _, names in os.walk(path):
      for n in names:
        if n not in OWN:
          out[os.path.relpath(os.path.join(d, n), path)] = open(os.path.join(d, n), "rb").read()
    return out
  where = location.parse(path)
  kv = location.open_kvstore(where)
  if where.scheme == "gs":  # the emulator's JSON API with a prefix (it ignores the key range TensorStore's list sends)
    api = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{where.bucket}/o?prefix={where.path}/"
    keys = [i["name"][len(where.path) + 1:].encode() for i in json.load(urllib.request.urlopen(api)).get("items", [])]
  else:
    keys = kv.list().result()
  return {k.decode(): kv.read(k).result().value for k in keys if k.decode() not in OWN}


def _binary(module: str, *argv, wait=True):
  proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  proc.stdout_text, proc.stderr_text = out, err
  return proc


def _export_flags(model_dir, corpus, out):  # noqa: F811
  return (f"--model={model_dir}", "--layer=1", f"--corpus={corpus}", f"--context_len={C}", f"--num_tokens={TOKENS}",
          f"--chunk_tokens={CHUNK}", "--contexts_per_batch=3", "--noprogress", f"--out_dir={out}")


def _counted(path: str) -> int:
  g = location.read_json(location.parse(path), "zarr.json")
  return g["attributes"]["num_tokens"] // CHUNK if g else 0


def _train_flags(out):
  return ("--width=48", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=64", "--n_primary_steps=2",
          "--n_meta_steps=1", f"--num_tokens={10 * 64}", "--shuffle_buffer_tokens=128", "--checkpoint_every_steps=5",
          "--noprogress", f"--out_dir={out}")


def _weights(run_dir) -> dict:
  return {sub: open(os.path.join(run_dir, sub, "sae.safetensors"), "rb").read() for sub in ("joint", "solo", "joint/meta")}


@pytest.fixture(scope="module")
def local_export(tmp_path_factory, model_dir, big_corpus):  # noqa: F811
  out = str(tmp_path_factory.mktemp("local") / "l1")
  proc = _binary("experiments.export_activations", *_export_flags(model_dir, big_corpus, out))
  assert proc.returncode == 0, proc.stderr_text
  return out


def _export_killed_and_rerun(url, model_dir, big_corpus):  # noqa: F811
  """The export binary SIGKILLed once it has counted 3 chunks, then run again to the end."""
  proc = _binary("experiments.export_activations", *_export_flags(model_dir, big_corpus, url), wait=False)
  end = time.time() + 240
  while proc.poll() is None and _counted(url) < 3 and time.time() < end:
    time.sleep(0.02)
  killed = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed and 3 <= _counted(url) < TOKENS // CHUNK, "the kill did not land mid-export"
  again = _binary("experiments.export_activations", *_export_flags(model_dir, big_corpus, url))
  assert again.returncode == 0, again.stderr_text  # the dead exporter's lease is taken over at once


def test_s3_export_killed_and_rerun_then_trained_equals_local(servers, local_export, model_dir, big_corpus,  # noqa: F811
                                                               tmp_path):
  url = "s3://bucket/l1"
  _export_killed_and_rerun(url, model_dir, big_corpus)
  assert _objects(url) == _objects(local_export)  # every chunk, checksum, manifest and view, byte for byte

  runs = {}
  for name, src in (("s3", url), ("local", local_export)):
    runs[name] = str(tmp_path / name)
    done = _binary("experiments.train", f"--activations={src}", *_train_flags(runs[name]))
    assert done.returncode == 0, done.stderr_text
  assert _weights(runs["s3"]) == _weights(runs["local"])
  recorded = json.load(open(os.path.join(runs["s3"], "run_config.json")))["data"]
  assert recorded["activations"] == "s3://bucket/l1/train" and recorded["shuffle_buffer_tokens"] == 128
  ev = _binary("experiments.evaluate", f"--run_dir={runs['s3']}", "--model=none", "--bootstrap_replicates=0",
               "--meta_fve_steps=0")
  assert ev.returncode == 0, ev.stderr_text
  assert json.load(open(os.path.join(runs["s3"], "report.json")))["activations"] == "s3://bucket/l1/heldout"


def test_s3_second_exporter_refused_by_the_lease(servers, model_dir, big_corpus):  # noqa: F811
  url = "s3://bucket/leased"
  holder = lease.Lease(url, "activation store").acquire()
  try:
    with pytest.raises(UserError, match="is being written by"):
      lease.Lease(url, "activation store").acquire()
    proc = _binary("experiments.export_activations", *_export_flags(model_dir, big_corpus, url))
    assert proc.returncode == 1 and proc.stderr_text.startswith("error: activation store s3://bucket/leased is "
                                                                 "being written by"), proc.stderr_text
    assert len(proc.stderr_text.strip().splitlines()) == 1
    assert list(_objects(url)) == []  # the refused exporter wrote nothing
  finally:
    holder.release()
  lease.Lease(url, "activation store").acquire().release()  # released: the next writer gets it
  assert not location.exists(location.parse(url), lease.LEASE_FILE)


def _flip_chunk_byte(url: str, key: str) -> None:
  kv = location.open_kvstore(location.parse(url))
  raw = bytearray(kv.read(key).result().value)
  raw[20] ^= 0x10
  kv.write(key, bytes(raw)).result()


def test_s3_damaged_chunk_is_one_line(servers, local_export):
  url = "s3://bucket/damaged"
  from metasae_jax.storage import convert
  convert.convert(local_export, url, chunk_tokens=CHUNK)
  _flip_chunk_byte(url, "activations/c/2/0")
  s = store.open_store(url)
  with pytest.raises(UserError, match=r"s3://bucket/damaged: chunk 2 of activations \(tokens 64-95\) is damaged"):
    s.read_chunk(2)


def _gcs_honours_preconditions() -> bool:
  kv = location.open_kvstore(location.parse("gs://gbucket/probe"))
  kv.write("p", b"1", if_equal=b"\x02").result()
  return not kv.write("p", b"2", if_equal=b"\x02").result().generation


def test_gcs_export_killed_and_rerun_train_and_damage(servers, local_export, model_dir, big_corpus,  # noqa: F811
                                                       tmp_path):
  url = "gs://gbucket/l1"
  _export_killed_and_rerun(url, model_dir, big_corpus)
  assert _objects(url) == _objects(local_export)
  config = TrainConfig(d_model=store.open_store(url).d_model, width=48, k=4, meta_width=6, meta_k=2, batch_size=64,
                       n_primary_steps=2, n_meta_steps=1)
  weights = []
  for name, src in (("gcs", url), ("local", local_export)):
    train_and_save(config, RunConfig(activations=store.split_of(src)[0], out_dir=str(tmp_path / name),
                                     num_tokens=6 * 64, shuffle_buffer_tokens=128, progress=False, curves=False))
    weights.append(_weights(str(tmp_path / name)))
  assert weights[0] == weights[1]
  _flip_chunk_byte(url, "tokens/c/1")
  with pytest.raises(UserError, match=r"gs://gbucket/l1: chunk 1 of tokens \(tokens 32-63\) is damaged"):
    store.open_store(url).read_chunk_tokens(1)


def test_gcs_lease(servers):
  if not _gcs_honours_preconditions():
    pytest.skip("gcp-storage-emulator ignores ifGenerationMatch, so a create-only write over an existing object "
                "succeeds there; the GCS lease needs a real bucket (or an emulator that honours preconditions)")
  holder = lease.Lease("gs://gbucket/leased", "activation store").acquire()
  try:
    with pytest.raises(UserError, match="is being written by"):
      lease.Lease("gs://gbucket/leased", "activation store").acquire()
  finally:
    holder.release()


def test_missing_stores_and_remote_run_directories_are_one_line(servers, local_export, tmp_path):
  with pytest.raises(UserError, match=r"s3://bucket/nothing: no zarr.json there"):
    store.open_store("s3://bucket/nothing")
  # A format-1 store copied to a bucket: read from local disk only, and the message says how to convert it.
  where = location.parse("s3://bucket/old")
  location.write_json(where, "manifest.json", {"format": store.FORMAT_NPY})
  with pytest.raises(UserError, match="read from local disk only.*convert_store"):
    store.open_store("s3://bucket/old")
  config = TrainConfig(d_model=32, width=48, k=4, meta_width=6, meta_k=2, batch_size=64)
  with pytest.raises(UserError, match="is not a local directory: run directories") as e:
    train_and_save(config, RunConfig(activations=local_export, out_dir="s3://bucket/run", progress=False))
  assert "\n" not in str(e.value)
