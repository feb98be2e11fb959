"""The OpenAI-compatible backend (official openai client) against a real HTTP server on 127.0.0.1, and the answer cache."""

import math
import os

import pytest

from metasae_jax.autointerp import scorers
from metasae_jax.autointerp.backends import BackendError, OpenAIBackend, make_backend
from metasae_jax.autointerp.cache import CachedBackend
from metasae_jax.core.errors import UserError
from tests import autointerp_util as util

MSG = [{"role": "user", "content": "How strongly? Answer with one number"}]
KEY_ENV = "METASAE_TEST_LLM_KEY"


@pytest.fixture
def server():
  s = util.FakeLLM()
  yield s
  s.close()


def _backend(server, **kw):
  kw = {"timeout_s": 5.0, "retries": 1, "api_key_env": KEY_ENV, **kw}
  return OpenAIBackend(server.base_url, "tiny", **kw)


def test_request_and_logprob_reading(server, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-test")
  out = _backend(server).complete(MSG, 3, ("0", "7"))
  req = server.requests[0]
  assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
  body = req["body"]
  assert body["temperature"] == 0 and body["logprobs"] is True and body["top_logprobs"] == 20
  assert body["model"] == "tiny" and body["messages"] == MSG and body["max_tokens"] == 3
  assert out.text == "7" and set(out.top_logprobs) == {"7", "3", "x"}
  # EV over the digit tokens: (7 e^-0.5 + 3 e^-1) / (e^-0.5 + e^-1).
  want = (7 * math.exp(-0.5) + 3 * math.exp(-1)) / (math.exp(-0.5) + math.exp(-1))
  assert scorers.read_strength(out) == pytest.approx(want)


def test_api_key_only_from_the_named_variable(server, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  b = _backend(server)
  b.complete(MSG, 3)
  assert "sk-" not in repr(vars(b)) and server.requests[-1]["auth"] == "Bearer EMPTY"


def test_yes_no_and_text_fallback(server):
  b = _backend(server)
  yes = b.complete([{"role": "user", "content": "Answer yes or no."}], 3)
  assert scorers.read_yes(yes) == pytest.approx(1 / (1 + math.exp(-1.6)))
  server.mode = "text_only"
  assert b.complete(MSG, 3).top_logprobs == {}
  assert scorers.read_strength(b.complete(MSG, 3)) == 7.0
  server.mode = "echo"  # the small-model failure: the example echoed back instead of a number
  assert scorers.read_strength(b.complete(MSG, 3)) > 5  # logprobs still answer


def test_timeout_retries_then_fails(server):
  server.mode = "slow"
  b = _backend(server, timeout_s=0.2, retries=1)
  with pytest.raises(BackendError, match="timeout"):
    b.complete(MSG, 3)
  assert len(server.requests) == 2  # one try plus one retry
  assert b.stats == {"calls": 1, "retries": 1, "failures": 1}


def test_server_errors_are_retried_by_the_client(server):
  server.fail_every = 2  # the first attempts of calls 2, 4, ... answer HTTP 500
  b = _backend(server, retries=2)
  outs = [b.complete(MSG, 3) for _ in range(4)]
  assert all(o.text == "7" for o in outs)
  # call 1: request 1; call 2: request 2 (500) + retry 3; call 3: 4; call 4: 5 (500) + retry 6.
  assert len(server.requests) == 6 and server.failed == 2
  assert b.stats == {"calls": 4, "retries": 2, "failures": 0}
  server.fail_all = True
  with pytest.raises(BackendError, match="HTTP 500"):
    b.complete(MSG, 3)
  assert len(server.requests) == 9 and b.stats["failures"] == 1  # one try + two retries


def test_a_reply_that_is_not_json_is_a_malformed_answer_not_a_failed_request(server):
  server.mode = "malformed"
  b = _backend(server, retries=0)
  out = b.complete(MSG, 3)
  assert out.text == "" and "malformed reply" in out.malformed and b.stats["failures"] == 0


def test_logprobs_that_are_no_log_probabilities_make_a_malformed_answer(server):
  server.reply = lambda body: {"id": "x", "object": "chat.completion", "created": 0, "model": "tiny", "choices": [{
      "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "7"},
      "logprobs": {"content": [{"token": "7", "logprob": 3.5, "bytes": None,
                                "top_logprobs": [{"token": "7", "logprob": 3.5, "bytes": None}]}]}}]}
  out = _backend(server, retries=0).complete(MSG, 3)
  assert out.malformed and "is not a log-probability" in out.malformed and out.text == ""


def test_unreachable_server_is_user_error():
  b = OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout_s=1.0, retries=0)
  with pytest.raises(UserError, match="unreachable"):
    b.complete(MSG, 3)


def test_make_backend_parsing(server):
  b = make_backend(f"openai:{server.base_url}#tiny")
  assert isinstance(b, OpenAIBackend) and b.base_url == server.base_url and b.model == "tiny"
  assert make_backend("openai:http://h:1#m").base_url == "http://h:1/v1"
  assert make_backend("openai:http://h:1/v1/chat/completions#m").base_url == "http://h:1/v1"
  for bad in ("openai:http://h:1", "local:", "foo:bar", "openai:ftp://h#m"):
    with pytest.raises(UserError):
      make_backend(bad)


def test_cache_makes_rerun_free(server, tmp_path):
  first = CachedBackend(_backend(server), str(tmp_path))
  a = first.complete(MSG, 3, ("7",))
  b = first.complete([{"role": "user", "content": "Answer yes or no."}], 3)
  assert len(server.requests) == 2 and first.requests == 2
  again = CachedBackend(_backend(server), str(tmp_path))
  assert again.complete(MSG, 3, ("7",)) == a
  assert again.complete([{"role": "user", "content": "Answer yes or no."}], 3) == b
  assert len(server.requests) == 2 and again.requests == 0 and again.hits == 2
  again.complete(MSG, 4, ("7",))  # a different request is not a hit
  assert len(server.requests) == 3


def test_failures_are_not_cached(server, tmp_path):
  server.mode = "malformed"
  cached = CachedBackend(_backend(server, retries=0), str(tmp_path))
  assert cached.complete(MSG, 3).malformed and not os.listdir(tmp_path)  # a garbage body is asked again
  server.mode = "ok"
  assert cached.complete(MSG, 3).text == "7"
  server.fail_all = True
  with pytest.raises(BackendError):
    CachedBackend(_backend(server, retries=0), str(tmp_path)).complete(MSG, 4)
  assert len(os.listdir(tmp_path)) == 1
