"""One writer per store on object storage: a lease object created with a create-only precondition.

`flock` does not reach object storage, so an exporter writing s3://... or gs://... first creates
`.metasae.lease` inside the store with TensorStore's conditional write (if-none-match / ifGenerationMatch=0):
exactly one of two exporters succeeds. The holder rewrites the lease (conditionally on its own generation)
every TTL/3 seconds; a lease not renewed for TTL seconds, or held by a dead process on this host, is taken
over with a write conditional on the stale lease's generation. A holder that finds its lease taken stops
before writing another chunk.
"""

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from metasae_jax.core.errors import UserError
from metasae_jax.storage import location as loc_lib

LEASE_FILE = ".metasae.lease"
TTL_S = float(os.environ.get("METASAE_LEASE_TTL_S", "60"))
_MISSING = b"\x02"  # TensorStore's generation of an absent key: a write conditional on it only creates


def _alive_here(record: dict) -> bool:
  """False if the holder ran on this host and its process is gone (a killed exporter: take over at once)."""
  if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
    return True
  try:
    os.kill(record["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lease:
  """Holds the lease on the store at `path` (s3:// or gs://) until `release`."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self.where = loc_lib.parse(path)
    self._kv = None
    self._generation: Optional[bytes] = None
    self._lost: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.token = uuid.uuid4().hex

  def _record(self) -> bytes:
    return json.dumps({"holder": f"{socket.gethostname()} pid {os.getpid()}", "host": socket.gethostname(),
                       "pid": os.getpid(), "token": self.token, "renewed": time.time(), "ttl_s": TTL_S}).encode()

  def _write(self, if_equal: bytes) -> Optional[bytes]:
    try:
      gen = self._kv.write(LEASE_FILE, self._record(), if_equal=if_equal).result().generation
    except ValueError as e:
      raise UserError(f"{self.what} {self.path}: cannot write its lease ({loc_lib.one_line(e)}). Check the "
                      "location and its credentials.") from None
    return gen or None  # an empty generation: the precondition failed, someone else wrote first

  def _take_over(self, stale: bytes) -> Optional[bytes]:
    """Replaces a stale lease, conditionally on its generation; a server that reports no generation for what it
    serves (gcp-storage-emulator) gets delete + create-only write instead."""
    try:
      return self._kv.write(LEASE_FILE, self._record(), if_equal=stale).result().generation or None
    except ValueError as e:
      if "Malformed StorageGeneration" not in str(e):
        raise UserError(f"{self.what} {self.path}: cannot write its lease ({loc_lib.one_line(e)}). Check the "
                        "location and its credentials.") from None
    self._kv.write(LEASE_FILE, None).result()
    return self._write(_MISSING)

  def acquire(self) -> "Lease":
    self._kv = loc_lib.open_kvstore(self.where)
    for _ in range(3):
      current = self._kv.read(LEASE_FILE).result()
      if current.state != "value":
        gen = self._write(_MISSING)
      else:
        try:
          record = json.loads(current.value)
        except ValueError:
          record = {}
        age = time.time() - float(record.get("renewed", 0))
        if age < float(record.get("ttl_s", TTL_S)) and _alive_here(record):
          raise UserError(f"{self.what} {self.path} is being written by {record.get('holder', 'another process')} "
                          f"(lease {LEASE_FILE}, renewed {age:.0f} s ago). Wait for it or stop it; one writer per "
                          f"store (a lease not renewed for {record.get('ttl_s', TTL_S):.0f} s is taken over).")
        gen = self._take_over(current.stamp.generation)
      if gen is not None:
        self._generation = gen
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()
        return self
    raise UserError(f"{self.what} {self.path}: another writer took its lease at the same moment. Rerun later; one "
                    "writer per store.")

  def _renew(self) -> None:
    while not self._stop.wait(TTL_S / 3):
      try:
        gen = self._write(self._generation)
      except UserError as e:
        self._lost = str(e)
        return
      if gen is None:
        self._lost = f"{self.what} {self.path}: another process took over its lease {LEASE_FILE}"
        return
      self._generation = gen

  def check(self) -> None:
    """Raises if the lease was lost (a stalled holder must not keep writing next to its successor)."""
    if self._lost:
      raise UserError(f"{self._lost}. Stopped before writing more; rerun once the other writer is done.")

  def release(self, remove_file: bool = True) -> None:
    del remove_file  # the lease object always goes: it only means anything while held
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    if not self._lost:
      try:
        self._kv.write(LEASE_FILE, None, if_equal=self._generation).result()
      except ValueError:
        pass  # a lease left behind expires after TTL_S

  def __enter__(self) -> "Lease":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
