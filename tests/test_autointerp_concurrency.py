"""Concurrent LLM requests against a real local HTTP server: overlap, equal results, retries, resume, detection."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.autointerp import pipeline, prompts, runner, scorers
from metasae_jax.autointerp.backends import Completion, OpenAIBackend
from metasae_jax.autointerp.cache import CachedBackend
from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.autointerp.pipeline import run_autointerp
from metasae_jax.core.errors import UserError
from metasae_jax.evaluation.examples import Example
from tests import autointerp_util as util


@pytest.fixture
def server():
  s = util.FakeLLM()
  s.mode = "hash"
  yield s
  s.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("conc")
  model_dir = util.make_model_dir(str(root / "model"))
  util.make_store(str(root / "store"), model_dir, num_contexts=32)
  return root


def _requests(n):
  return [runner.Request([{"role": "user", "content": f"Text {i}. How strongly? one number"}], 3,
                         prompts.STRENGTHS) for i in range(n)]


def _llm(server, path, retries=1):
  return CachedBackend(OpenAIBackend(server.base_url, "tiny", timeout_s=10.0, retries=retries), str(path))


def test_requests_overlap_and_match_the_sequential_run(server, tmp_path):
  reqs = _requests(16)
  server.delay_s = 0.3
  seq = runner.run_requests(_llm(server, tmp_path / "a"), reqs, 1)
  assert server.max_in_flight == 1
  server.max_in_flight = 0
  par = runner.run_requests(_llm(server, tmp_path / "b"), reqs, 8)
  assert server.max_in_flight >= 8
  assert par == seq and len({c.text for c in seq}) > 1  # ordered by request, answers vary
  assert len(os.listdir(tmp_path / "b")) == 16  # every answer cached, none lost to a race


def test_duplicates_are_sent_once(server, tmp_path):
  reqs = _requests(4)
  llm = _llm(server, tmp_path)
  out = runner.run_requests(llm, reqs + reqs[:2], 4)
  assert out[4:] == out[:2] and len(server.requests) == 4 and llm.requests == 4 and llm.hits == 2


def test_failing_server_is_retried_with_correct_results(server, tmp_path):
  reqs = _requests(12)
  clean = runner.run_requests(_llm(server, tmp_path / "a"), reqs, 4)
  server.fail_every = 3  # the first attempt of every third call answers HTTP 500
  llm = _llm(server, tmp_path / "b", retries=1)
  flaky = runner.run_requests(llm, reqs, 4)
  assert flaky == clean and server.failed == 4
  assert llm.inner.stats["retries"] == server.failed and llm.inner.stats["failures"] == 0


def test_requests_failing_after_retries_are_none_not_cached(server, tmp_path):
  server.fail_all = True
  llm = _llm(server, tmp_path, retries=1)
  assert runner.run_requests(llm, _requests(3), 2) == [None, None, None]
  assert llm.inner.stats == {"calls": 3, "retries": 3, "failures": 3} and not os.listdir(tmp_path)


def _cfg(run_dir, store, base_url, **kw):
  base = dict(run_dir=run_dir, activations=store, num_tokens=0, num_latents=2, batch_size=64,
              window=8, max_examples=3, num_score=2, num_negative=2, pool_top=8, pool_random=8,
              explain_max_tokens=4, progress=False, llm_base_url=base_url, llm_model="tiny", retries=3)
  return AutointerpConfig(**{**base, **kw})


def _headline(scores):
  return {k: scores[k] for k in ("joint", "solo", "paired")}


def test_pipeline_results_do_not_depend_on_concurrency(world, server, tmp_path):
  store = str(world / "store")
  runs = {}
  for c in (1, 6):
    run = str(tmp_path / f"run{c}")
    util.make_run(run)
    server.fail_every = 0 if c == 1 else 4  # the concurrent run also survives server errors
    server.failed = 0
    runs[c] = run_autointerp(_cfg(run, store, server.base_url, concurrency=c))
  assert _headline(runs[1]) == _headline(runs[6])
  assert runs[6]["llm_retries"] == server.failed > 0 and runs[6]["unscored_latents"] == 0
  lats = runs[1]["joint"]["latents"]
  assert len({lat["explanation"] for lat in lats}) == 2 and all(lat["scored"] for lat in lats)


def test_interrupted_run_resumes_without_repeating_calls(world, server, tmp_path, request):
  store = str(world / "store")
  ref_run = str(tmp_path / "ref")
  util.make_run(ref_run)
  ref = run_autointerp(_cfg(ref_run, store, server.base_url, concurrency=4))
  total = len(server.requests)
  assert total == ref["llm_requests"] > 20

  run = str(tmp_path / "run")
  util.make_run(run)
  server.requests.clear()
  # Ctrl-C mid-way: a real SIGINT to this process. Python's own handler is installed for the test: a
  # process started in the background by a shell without job control inherits SIGINT ignored, and then
  # neither a signal nor _thread.interrupt_main raises anything (seen when `make test` ran as `cmd &`).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
  server.on_request = lambda n: os.kill(os.getpid(), signal.SIGINT) if n == total // 2 else None
  with pytest.raises(KeyboardInterrupt):
    run_autointerp(_cfg(run, store, server.base_url, concurrency=4))
  first = len(server.requests)
  assert total // 2 <= first < total
  server.on_request = None
  again = run_autointerp(_cfg(run, store, server.base_url, concurrency=4))
  # Every request of the interrupted run was answered and cached: none is sent twice.
  assert first + again["llm_requests"] == total
  assert len({str(r["body"]["messages"]) for r in server.requests}) == total
  assert _headline(again) == _headline(ref)


def _is_explanation(body) -> bool:
  content = body["messages"][-1]["content"]
  return "How strongly" not in content and "yes or no" not in content


def test_unanswerable_latents_are_unscored_not_zero(world, server, tmp_path):
  run = str(tmp_path / "run")
  util.make_run(run)
  doomed = []

  def fault(body):  # the first latent's explanation request fails on every attempt; the rest are answered
    content = body["messages"][-1]["content"]
    if _is_explanation(body) and (not doomed or doomed[0] == content):
      doomed[:1] = [content]
      return "fail"
    return None
  server.fault = fault
  scores = run_autointerp(_cfg(run, str(world / "store"), server.base_url, concurrency=1, retries=1))
  assert scores["unscored_latents"] == 1 and scores["llm_failed_requests"] == 1
  latents = scores["joint"]["latents"] + scores["solo"]["latents"]
  unscored = [lat for lat in latents if not lat["scored"]]
  assert len(unscored) == 1 and all(unscored[0][m] is None for m in ("fuzz_spearman", "fuzz_balanced_accuracy"))
  assert all(lat["fuzz_balanced_accuracy"] is not None for lat in latents if lat["scored"])


def test_every_request_failing_is_an_error_and_writes_nothing(world, server, tmp_path):
  run = str(tmp_path / "run")
  util.make_run(run)
  server.fail_all = True
  with pytest.raises(UserError, match=r"none of the 4 LLM requests .* got a usable answer \(4 failed after retries, "
                                      r"0 malformed; last: .*HTTP 500"):
    run_autointerp(_cfg(run, str(world / "store"), server.base_url, concurrency=4, retries=1))
  assert not os.path.exists(os.path.join(run, "autointerp", "scores.json"))


def test_replies_that_are_not_json_count_as_malformed_answers(world, server, tmp_path):
  run = str(tmp_path / "run")
  util.make_run(run)
  garbled = []

  def fault(body):  # one scoring reply in five is not JSON at all; explanations are fine
    if not _is_explanation(body):
      garbled.append(len(garbled) % 5 == 0)
      return "malformed" if garbled[-1] else None
    return None
  server.fault = fault
  scores = run_autointerp(_cfg(run, str(world / "store"), server.base_url, concurrency=1, retries=1))
  assert scores["llm_failed_requests"] == 0 and scores["llm_malformed_answers"] == sum(garbled) > 0
  # Garbled replies are not cached: a rerun asks exactly those again.
  server.fault, before = None, len(server.requests)
  again = run_autointerp(_cfg(run, str(world / "store"), server.base_url, concurrency=1, retries=1))
  assert len(server.requests) - before == sum(garbled) and again["llm_malformed_answers"] == 0
  server.mode, server.fault = "malformed", None
  with pytest.raises(UserError, match="malformed reply"):
    run_autointerp(_cfg(str(tmp_path / "run"), str(world / "store"), server.base_url, concurrency=1, retries=1,
                        seed=5))


class _Words:
  """Detokenizer stub: token id i -> " word_i"."""

  def pieces(self, ids):
    return [" " + util.WORDS[i] for i in ids]


class _CatJudge:
  """Answers yes iff the text contains "cat" (a perfect explanation for a cat latent)."""
  name = "cat-judge"

  def complete(self, messages, max_tokens, choices=()):
    text = messages[-1]["content"].split("Text: ")[1].split("\n")[0]
    if "How strongly" in messages[-1]["content"]:
      return Completion("9" if "cat" in text else "0", {}, None)
    return Completion("yes" if "cat" in text else "no", {}, None)


def test_detection_scorer_on_hand_built_contexts(tmp_path):
  w = {word: i for i, word in enumerate(util.WORDS)}

  def ex_(words, acts, end):
    return Example(tuple(w[x] for x in words), tuple(acts), end)

  held = [ex_(["the", "cat", "sat"], [0, 2.0, 0], 1),       # fires on cat: judge says yes (right)
          ex_(["a", "red", "cat"], [0, 0, 3.0], 2),          # right
          ex_(["the", "dog", "ran"], [0, 1.0, 0], 3)]        # fires without cat: judge says no (wrong)
  negs = [ex_(["big", "cat", "on"], [0, 0, 0], 4),           # silent but has cat: judge says yes (wrong)
          ex_(["the", "mat", "and"], [0, 0, 0], 5),          # right
          ex_(["small", "blue", "mat"], [0, 0, 0], 6)]       # right
  lat = pipeline.LatentExamples("joint", 7, 10, 3.0, [], held, negs)
  cfg = AutointerpConfig(run_dir="r", activations="a", num_score=3, num_negative=3).resolve()
  plan = pipeline._score_plan(cfg, lat, "cats", _Words(), np.random.default_rng(0))
  det = [(req, label) for sc, req, label in plan if sc == "detection"]
  assert [label for _, label in det] == [True, True, True, False, False, False]
  assert all("<<" not in req.messages[-1]["content"] for req, _ in det)  # whole contexts, no marks
  llm = CachedBackend(_CatJudge(), str(tmp_path))
  answers = runner.run_requests(llm, [req for _, req, _ in plan], 3)
  out = pipeline._score(lat, "cats", [(sc, a, label) for (sc, _, label), a in zip(plan, answers)])
  # Positives: 2 of 3 right; negatives: 2 of 3 right.
  assert out["detection_balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
  assert out["contexts"]["detection"] == {"total": 6, "activating": 3}
  # Same answers through the scorer functions directly.
  p_yes = [scorers.read_yes(a) for (sc, _, _), a in zip(plan, answers) if sc == "detection"]
  assert p_yes == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_binary_flags_and_the_api_key_stays_in_the_environment(world, server, tmp_path):
  run = str(tmp_path / "run")
  util.make_run(run)
  secret = "sk-do-not-leak-1234"
  env = {**os.environ, "MY_LLM_KEY": secret, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "experiments.autointerp", "--run_dir", run, "--activations",
         str(world / "store"), "--num_tokens", "0", "--num_latents", "1", "--batch_size", "64",
         "--window", "8", "--max_examples", "3", "--num_score", "2", "--num_negative", "2",
         "--detection_negative", "3", "--llm_base_url", server.base_url, "--llm_model", "tiny",
         "--llm_api_key_env", "MY_LLM_KEY", "--concurrency", "3"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout)
  assert set(summary["paired"]) == {"fuzz_spearman", "fuzz_balanced_accuracy", "detection_balanced_accuracy"}
  assert server.requests and all(r["auth"] == f"Bearer {secret}" for r in server.requests)
  # 2 latents x (1 explanation + strength 2+2 + fuzz 2+2 + detection 2+3), minus repeats within the run.
  assert len(server.requests) <= 2 * (1 + 4 + 4 + 5)
  assert secret not in out.stdout + out.stderr
  for dirpath, _, files in os.walk(run):
    for name in files:
      with open(os.path.join(dirpath, name), "rb") as f:
        assert secret.encode() not in f.read(), name
  # Every request failing: one error line, exit 1, and the earlier scores.json is left as it was.
  with open(os.path.join(run, "autointerp", "scores.json"), "rb") as f:
    kept = f.read()
  server.fail_all = True
  out = subprocess.run(cmd + ["--seed", "7", "--retries", "0"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and lines[-1].startswith("error: none of the ") and "Traceback" not in out.stderr
  with open(os.path.join(run, "autointerp", "scores.json"), "rb") as f:
    assert f.read() == kept
