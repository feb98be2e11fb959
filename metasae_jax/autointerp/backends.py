"""LLM backends for explaining and scoring: an in-process transformers chat model and an OpenAI-compatible HTTP server."""

import dataclasses
import math
import os
import threading
from typing import Optional, Protocol, Sequence

from absl import logging as log

from metasae_jax.core.errors import UserError


TOP_LOGPROBS = 20
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


@dataclasses.dataclass(frozen=True)
class Completion:
  """One greedy answer and the log-probabilities of its first token."""
  text: str
  top_logprobs: dict
  """The first generated token's most likely alternatives: token string -> logprob."""
  choice_logprobs: Optional[dict] = None
  """logprob that the answer's first token is exactly each requested choice (where the backend can tell)."""
  malformed: Optional[str] = None
  """Why the server's reply was no chat completion at all (not JSON, no choices, ...); the text is then empty,
  the answer counts as malformed, and it is never cached (a rerun asks again)."""

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict) -> "Completion":
    return cls(str(obj["text"]), dict(obj["top_logprobs"]), obj.get("choice_logprobs"), obj.get("malformed"))


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
  """An OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM, llama.cpp server) via the official client.

  The client's own retries (exponential backoff, Retry-After) and timeouts apply; one
  client is shared by all worker threads (its HTTP connection pool is thread-safe).
  """

  def __init__(self, base_url: str, model: str, timeout_s: float = 60.0, retries: int = 3,
               api_key_env: str = DEFAULT_API_KEY_ENV):
    import openai  # pylint: disable=g-import-not-at-top
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
      raise UserError(f"LLM base URL {base_url!r} must start with http:// or https://.")
    if url.endswith("/chat/completions"):
      url = url[:-len("/chat/completions")]
    if not url.endswith("/v1"):
      url += "/v1"
    if not model:
      raise UserError(f"LLM server {url}: name the model (--llm_model).")
    self.base_url, self.model = url, model
    self.name = f"openai:{url}#{model}"
    self.retries = retries
    # The key only ever lives in the environment and in the client's headers: never in a flag,
    # a file under the run directory, the cache key or a log line.
    key = os.environ.get(api_key_env) if api_key_env else None
    self._openai = openai
    self._client = openai.OpenAI(base_url=url, api_key=key or "EMPTY", timeout=timeout_s,
                                 max_retries=retries)
    self._lock = threading.Lock()
    self.stats = {"calls": 0, "retries": 0, "failures": 0}

  def _count(self, retries: int, failed: bool) -> None:
    with self._lock:
      self.stats["calls"] += 1
      self.stats["retries"] += retries
      self.stats["failures"] += int(failed)

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    del choices  # the server cannot restrict its logprobs; read_strength / read_yes pick them out
    oa = self._openai
    try:
      raw = self._client.chat.completions.with_raw_response.create(
          model=self.model, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True,
          top_logprobs=TOP_LOGPROBS)
      retries = raw.retries_taken
      out = _parse_reply(raw.parse())
    except (oa.AuthenticationError, oa.PermissionDeniedError, oa.NotFoundError) as e:
      raise UserError(f"LLM server {self.base_url} answered HTTP {e.status_code} for model "
                      f"{self.model!r}. Check --llm_base_url, --llm_model and the API key variable "
                      "named by --llm_api_key_env.") from e
    except oa.APITimeoutError as e:
      self._count(self.retries, True)
      raise BackendError(f"{self.base_url}: timeout after {self.retries} retries") from e
    except oa.APIConnectionError as e:
      raise UserError(f"LLM server {self.base_url} is unreachable ({e.__cause__ or e}). Start it or "
                      "fix --llm_base_url.") from e
    except oa.APIStatusError as e:
      retried = e.status_code in (408, 409, 429) or e.status_code >= 500
      self._count(self.retries if retried else 0, True)
      raise BackendError(f"{self.base_url}: HTTP {e.status_code}") from e
    except (oa.APIResponseValidationError, ValueError, KeyError, IndexError, TypeError,
            AttributeError) as e:
      # The server answered, but not with a chat completion: a malformed answer, not a failed request.
      self._count(0, False)
      return Completion("", {}, None, f"{self.base_url}: malformed reply ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:200]})")
    self._count(retries, False)
    return out


def _parse_reply(reply) -> Completion:
  """Reads choices[0].message.content and the first token's top_logprobs; raises on a malformed reply."""
  if not hasattr(reply, "choices"):  # the client hands back non-JSON bodies as plain strings
    raise TypeError(f"reply is not a chat completion: {str(reply)[:80]!r}")
  choice = reply.choices[0]
  text = choice.message.content
  if not isinstance(text, str):
    raise TypeError("message.content is not a string")
  top: dict = {}
  content = (choice.logprobs.content if choice.logprobs is not None else None) or []
  if content:
    for alt in content[0].top_logprobs or []:
      key, lp = alt.token, float(alt.logprob)
      if not isinstance(key, str) or math.isnan(lp) or lp > 1e-6:  # -inf is a probability of 0
        raise ValueError(f"top_logprobs entry {key!r}: {lp} is not a log-probability")
      top[key] = _logaddexp(top.get(key), lp)
  return Completion(text, top, None)


def make_backend(spec: str, timeout_s: float = 60.0, retries: int = 3,
                 api_key_env: str = DEFAULT_API_KEY_ENV) -> Backend:
  """Parses `local:<model>` or `openai:<base_url>#<model>`."""
  kind, _, rest = spec.partition(":")
  if kind == "local" and rest:
    return LocalBackend(rest)
  if kind == "openai":
    base, _, model = rest.rpartition("#")
    if base and model:
      return OpenAIBackend(base, model, timeout_s, retries, api_key_env)
  raise UserError(f"--llm {spec!r}: use local:<hf id | dir | smollm2-135m-gguf> or "
                  "openai:<base_url>#<model>, e.g. openai:http://127.0.0.1:8000/v1#my-model "
                  "(or --llm_base_url and --llm_model).")
