"""LLM backends for explaining and scoring: an in-process transformers chat model and an OpenAI-compatible HTTP server."""

import dataclasses
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Optional, Protocol, Sequence

from metasae_jax.core.errors import UserError

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class Completion:
  """One greedy answer and the log-probabilities of its first token."""
  text: str
  top_logprobs: dict
  """The first generated token's most likely alternatives: token string -> logprob."""
  choice_logprobs: Optional[dict] = None
  """logprob that the answer's first token is exactly each requested choice (where the backend can tell)."""

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict) -> "Completion":
    return cls(str(obj["text"]), dict(obj["top_logprobs"]), obj.get("choice_logprobs"))


class BackendError(Exception):
  """One request failed (timeout, malformed reply, server error): that example counts as failed."""


class Backend(Protocol):
  """Anything that answers chat messages."""
  name: str
  """Identifies the model and endpoint (part of the cache key)."""

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    ...


def _logaddexp(a: Optional[float], b: float) -> float:
  return b if a is None else max(a, b) + math.log1p(math.exp(-abs(a - b)))


class LocalBackend:
  """A transformers chat model in this process: chat template, greedy decoding, logprobs from the logits.

  The model loads on the first request, so a run answered entirely from the cache never loads it.
  """

  def __init__(self, model: str, loaded=None):
    self.model_name = model
    self.name = f"local:{model}"
    self._lm = loaded

  def _load(self):
    if self._lm is None:
      from metasae_jax.lm import models  # pylint: disable=g-import-not-at-top
      log.info("loading explainer/scorer model %s", self.model_name)
      self._lm = models.load_model(self.model_name)
    return self._lm

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    from metasae_jax.lm import chat  # pylint: disable=g-import-not-at-top  (torch stays in lm/)
    return Completion(*chat.complete(self._load(), messages, max_tokens, choices, TOP_LOGPROBS))


class OpenAIBackend:
  """An OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM, llama.cpp server) over urllib."""

  def __init__(self, base_url: str, model: str, timeout_s: float = 60.0, retries: int = 3,
               backoff_s: float = 1.0, api_key: Optional[str] = None):
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
      raise UserError(f"--llm openai:{base_url}#{model}: the base URL must start with http:// or https://.")
    if not url.endswith("/chat/completions"):
      url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    self.url, self.model = url, model
    self.name = f"openai:{url}#{model}"
    self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
    self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

  def _post(self, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    req = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
      return json.loads(resp.read().decode("utf-8"))

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    last = "no attempt"
    unreachable = False
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      try:
        return _parse_reply(self._post(body))
      except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404):
          raise UserError(f"LLM server {self.url} answered HTTP {e.code} for model {self.model!r}. "
                          "Check the base URL, the model name and OPENAI_API_KEY.") from e
        last = f"HTTP {e.code}"
        if e.code != 429 and e.code < 500:
          break  # the request itself is bad; repeating it will not help
      except urllib.error.URLError as e:
        is_timeout = isinstance(e.reason, (socket.timeout, TimeoutError))
        last = "timeout" if is_timeout else f"cannot connect ({e.reason})"
        unreachable = not is_timeout
      except (socket.timeout, TimeoutError):
        last, unreachable = "timeout", False
      except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
        last, unreachable = f"malformed reply ({type(e).__name__}: {e})", False
      except (ConnectionError, OSError) as e:
        last, unreachable = f"connection failed ({e})", True
      log.warning("LLM request to %s failed (attempt %d/%d): %s", self.url, attempt + 1,
                  self.retries + 1, last)
    if unreachable:
      raise UserError(f"LLM server {self.url} is unreachable ({last}). Start it or fix --llm.")
    raise BackendError(f"{self.url}: {last}")


def _parse_reply(reply: dict) -> Completion:
  """Reads choices[0].message.content and the first token's top_logprobs; raises on a malformed reply."""
  choice = reply["choices"][0]
  text = choice["message"]["content"]
  if not isinstance(text, str):
    raise TypeError("message.content is not a string")
  top: dict = {}
  content = ((choice.get("logprobs") or {}).get("content")) or []
  if content:
    for alt in content[0].get("top_logprobs") or []:
      key, lp = alt["token"], float(alt["logprob"])
      top[key] = _logaddexp(top.get(key), lp)
  return Completion(text, top, None)


def make_backend(spec: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0) -> Backend:
  """Parses `local:<model>` or `openai:<base_url>#<model>`."""
  kind, _, rest = spec.partition(":")
  if kind == "local" and rest:
    return LocalBackend(rest)
  if kind == "openai":
    base, _, model = rest.rpartition("#")
    if base and model:
      return OpenAIBackend(base, model, timeout_s, retries, backoff_s)
  raise UserError(f"--llm {spec!r}: use local:<hf id | dir | smollm2-135m-gguf> or "
                  "openai:<base_url>#<model>, e.g. openai:http://127.0.0.1:8000/v1#my-model.")
