"""Where a store lives: a local directory, `s3://bucket/prefix` or `gs://bucket/prefix`, and its small objects.

Every store location a binary takes goes through here: parsing, joining (`STORE/train`), the TensorStore
kvstore spec, and reading/writing small objects (JSON metadata, the export lease). Credentials come only from
the standard places: S3 from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (plus `AWS_SESSION_TOKEN`),
`AWS_ENDPOINT_URL` and `AWS_REGION`; GCS from application default credentials, and `STORAGE_EMULATOR_HOST`
points it at an emulator.
"""

import dataclasses
import json
import os
import posixpath
from typing import Optional

from metasae_jax.core.errors import UserError

REMOTE_SCHEMES = ("s3", "gs")


@dataclasses.dataclass(frozen=True)
class Location:
  """A parsed location: scheme "file" (path is an absolute local path) or s3/gs (bucket + key prefix)."""
  scheme: str
  bucket: str
  path: str

  @property
  def is_local(self) -> bool:
    return self.scheme == "file"

  def __str__(self) -> str:
    if self.is_local:
      return self.path
    return f"{self.scheme}://{self.bucket}/{self.path}" if self.path else f"{self.scheme}://{self.bucket}"

  def join(self, *parts: str) -> "Location":
    if self.is_local:
      return Location("file", "", os.path.normpath(os.path.join(self.path, *parts)))
    return Location(self.scheme, self.bucket, posixpath.normpath(posixpath.join("/", self.path, *parts)).lstrip("/"))

  def relative_to(self, base: "Location") -> Optional[str]:
    """This location as a path relative to `base` (same scheme and bucket), else None."""
    if (self.scheme, self.bucket) != (base.scheme, base.bucket):
      return None
    if self.is_local:
      return os.path.relpath(self.path, base.path)
    return posixpath.relpath("/" + self.path, "/" + base.path)

  def kvstore(self) -> dict:
    """TensorStore kvstore spec of this location as a directory (its keys are names inside it)."""
    prefix = self.path.rstrip("/") + "/" if self.path else ""
    if self.is_local:
      return {"driver": "file", "path": prefix}
    if self.scheme == "s3":
      return dict({"driver": "s3", "bucket": self.bucket, "path": prefix}, **_s3_options())
    _gcs_environment()
    return {"driver": "gcs", "bucket": self.bucket, "path": prefix}


def parse(location: str) -> Location:
  """A location string (local path, s3://bucket/prefix, gs://bucket/prefix) as a Location."""
  if not isinstance(location, str) or not location:
    raise UserError("an empty store location was given; pass a directory, s3://bucket/prefix or "
                    "gs://bucket/prefix.")
  if "://" in location:
    scheme, rest = location.split("://", 1)
    if scheme == "file":
      return Location("file", "", os.path.abspath(rest))
    if scheme not in REMOTE_SCHEMES:
      raise UserError(f"{location}: scheme {scheme}:// is not supported; use a local path, s3:// or gs://.")
    bucket, _, path = rest.partition("/")
    if not bucket:
      raise UserError(f"{location} names no bucket; write {scheme}://BUCKET/PREFIX.")
    return Location(scheme, bucket, posixpath.normpath(path).strip("/") if path.strip("/") else "")
  return Location("file", "", os.path.abspath(location))


def normalize(location: str) -> str:
  """The canonical spelling (absolute local path or scheme://bucket/prefix) recorded in run configs."""
  return str(parse(location))


def is_remote(location: str) -> bool:
  return "://" in str(location) and not str(location).startswith("file://")


def join(location: str, *parts: str) -> str:
  """`location/part/...`; local paths stay as given (relative stays relative), URLs are normalised."""
  if not is_remote(location):
    return os.path.join(location, *parts)
  return str(parse(location).join(*parts))


def resolve(base: str, relative: str) -> str:
  """A path recorded relative to `base` (a view's `view_of`), as a location."""
  if os.path.isabs(relative) or "://" in relative:
    return relative
  if not is_remote(base):
    return os.path.normpath(os.path.join(base, relative))
  return str(parse(base).join(relative))


def _s3_options() -> dict:
  """Endpoint, region and credentials from the standard AWS_* variables (nothing else is read)."""
  opts: dict = {}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    opts["endpoint"] = endpoint
    # S3-compatible servers (MinIO, moto, ...) get TensorStore's conditional writes too: the export lease is a
    # create-only write, which is only atomic with If-None-Match (AWS endpoints use it already).
    os.environ.setdefault("TENSORSTORE_S3_USE_CONDITIONAL_WRITE", "1")
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    opts["aws_region"] = region
  if os.environ.get("AWS_ACCESS_KEY_ID"):
    # Keys in the environment: use them alone (the default chain also probes ~/.aws and logs when it is absent).
    opts["aws_credentials"] = {"type": "environment"}
  return opts


def _gcs_environment() -> None:
  """STORAGE_EMULATOR_HOST (the variable Google's clients read) → TensorStore's own TENSORSTORE_GCS_HTTP_URL."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"


def open_kvstore(location: Location):
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  try:
    return ts.KvStore.open(location.kvstore()).result()
  except ValueError as e:
    raise UserError(f"cannot open {location}: {one_line(e)}. Check the location and its credentials.") from None


def one_line(e: BaseException) -> str:
  """An error's message on one line (TensorStore's carry newlines and source positions)."""
  text = " ".join(str(e).split())
  return text[:400] + ("..." if len(text) > 400 else "")


def read_bytes(location: Location, key: str) -> Optional[bytes]:
  """The object `key` inside `location`, or None if it does not exist."""
  if location.is_local:
    try:
      with open(os.path.join(location.path, key), "rb") as f:
        return f.read()
    except (FileNotFoundError, NotADirectoryError):
      return None
    except IsADirectoryError:
      return None
  try:
    r = open_kvstore(location).read(key).result()
  except ValueError as e:
    raise UserError(f"cannot read {location.join(key)}: {one_line(e)}. Check the location and its "
                    "credentials.") from None
  return r.value if r.state == "value" else None


def read_json(location: Location, key: str) -> Optional[dict]:
  """A JSON object inside `location` (None if missing); a damaged one is a UserError naming it."""
  raw = read_bytes(location, key)
  if raw is None:
    return None
  try:
    return json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{location.join(key)} is not valid JSON ({e}). Re-export the store (it was edited or "
                    "damaged).") from None


def write_bytes(location: Location, key: str, data: bytes) -> None:
  """Writes one object whole: a temp file and rename locally, a single PUT on object storage."""
  if location.is_local:
    from metasae_jax.storage import atomic  # pylint: disable=g-import-not-at-top
    atomic.write_bytes(os.path.join(location.path, key), data)
    return
  try:
    open_kvstore(location).write(key, data).result()
  except ValueError as e:
    raise UserError(f"cannot write {location.join(key)}: {one_line(e)}. Check the location and its "
                    "credentials.") from None


def write_json(location: Location, key: str, obj) -> None:
  write_bytes(location, key, (json.dumps(obj, indent=2) + "\n").encode())


def delete(location: Location, key: str) -> None:
  """Removes one object or file (absent is fine)."""
  if location.is_local:
    try:
      os.remove(os.path.join(location.path, key))
    except FileNotFoundError:
      pass
    return
  try:
    open_kvstore(location).write(key, None).result()
  except ValueError as e:
    raise UserError(f"cannot delete {location.join(key)}: {one_line(e)}. Check the location and its "
                    "credentials.") from None


def exists(location: Location, key: str) -> bool:
  if location.is_local:
    return os.path.isfile(os.path.join(location.path, key))
  return read_bytes(location, key) is not None
