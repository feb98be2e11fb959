"""End to end on a tiny synthetic run dir: a random offline Llama as explainer/scorer, and the HTTP server as LLM."""

import json
import os

import pytest

from metasae_jax.autointerp.backends import LocalBackend
from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.autointerp.pipeline import run_autointerp
from metasae_jax.core.errors import UserError
from tests import autointerp_util as util


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  model_dir = util.make_model_dir(str(root / "model"))
  util.make_store(str(root / "store"), model_dir, num_contexts=32)
  return root, model_dir


def _cfg(run_dir, store, **kw):
  base = dict(run_dir=run_dir, activations=store, num_tokens=0, num_latents=2, batch_size=64,
              window=8, concurrency=2, max_examples=3, num_score=2, num_negative=2, pool_top=8, pool_random=8,
              explain_max_tokens=4, progress=False)
  return AutointerpConfig(**{**base, **kw})


def test_local_model_end_to_end_and_cached_rerun(world, tmp_path):
  root, model_dir = world
  run = str(tmp_path / "run")
  util.make_run(run, threshold_solo=True)
  cfg = _cfg(run, str(root / "store"), llm=f"local:{model_dir}")
  scores = run_autointerp(cfg)
  for name in ("joint", "solo"):
    s = scores[name]
    assert s["num_latents"] == 2 and len(s["latents"]) == 2
    assert -1 <= s["fuzz_spearman"] <= 1 and 0 <= s["fuzz_balanced_accuracy"] <= 1
    assert 0 <= s["detection_balanced_accuracy"] <= 1
    for lat in s["latents"]:
      assert set(lat) >= {"id", "explanation", "fuzz_spearman", "fuzz_balanced_accuracy",
                          "detection_balanced_accuracy"}
      assert lat["scored"] and lat["failed_requests"] == 0
  assert scores["paired"]["num_pairs"] == 2 and scores["paired"]["fuzz_spearman"]["num_scored"] == 2
  lats = scores["joint"]["latents"] + scores["solo"]["latents"]
  assert all(lat["num_held_out"] == 2 and lat["num_negative"] == 2 for lat in lats)
  # Identical prompts (same explanation, shared negative window) are asked once even within a run.
  asked = scores["llm_requests"] + scores["llm_cache_hits"]
  assert asked == 4 * (1 + 3 * (2 + 2)) and scores["llm_requests"] > asked // 2
  assert scores["unscored_latents"] == 0 and scores["llm_failed_requests"] == 0
  out = os.path.join(run, "autointerp")
  with open(os.path.join(out, "scores.json")) as f:
    assert json.load(f)["joint"] == scores["joint"]
  assert "## Pair 1" in open(os.path.join(out, "explanations.md")).read()
  assert "| detection (delphi)" in open(os.path.join(out, "report.md")).read()
  assert open(os.path.join(out, "paired_differences.png"), "rb").read(4) == b"\x89PNG"

  backend = LocalBackend(model_dir)
  again = run_autointerp(cfg, backend=backend)
  assert again["llm_requests"] == 0 and again["llm_cache_hits"] == asked
  assert backend._lm is None  # the model never loaded: every answer came from the cache
  assert again["joint"] == scores["joint"] and again["paired"] == scores["paired"]


def test_http_llm_end_to_end(world, tmp_path):
  root, _ = world
  run = str(tmp_path / "run")
  util.make_run(run)
  server = util.FakeLLM()
  try:
    server.mode = "ok"
    cfg = _cfg(run, str(root / "store"), llm=f"openai:{server.base_url}#tiny", num_latents=1)
    good = run_autointerp(cfg)
    lat = good["joint"]["latents"][0]
    assert lat["explanation"] == "animal words" and lat["failed_answers"] == 0
    # The server always predicts 7 with "yes": every activating context is "correct", every negative wrong.
    for metric, scorer in (("fuzz_balanced_accuracy", "fuzz"), ("detection_balanced_accuracy", "detection")):
      c = lat["contexts"][scorer]
      assert lat[metric] == pytest.approx(0.5 if 0 < c["activating"] < c["total"] else 1.0)
    assert lat["fuzz_spearman"] == 0.0 and not lat["fuzz_spearman_defined"]

    server.mode = "echo"  # text echoes the example, as SmolLM2-135M does; logprobs still answer
    cfg = _cfg(str(tmp_path / "run"), str(root / "store"), llm=f"openai:{server.base_url}#tiny",
               num_latents=1, seed=1)
    lat = run_autointerp(cfg)["joint"]["latents"][0]
    c = lat["contexts"]["fuzz"]
    assert lat["failed_answers"] == 0
    assert lat["fuzz_balanced_accuracy"] == pytest.approx(0.5 if 0 < c["activating"] < c["total"] else 1.0)
  finally:
    server.close()


def test_text_only_malformed_answers_are_failures(world, tmp_path):
  root, _ = world
  run = str(tmp_path / "run")
  util.make_run(run)
  server = util.FakeLLM()
  server.mode = "text_only"
  original = server.reply

  def echo_reply(body):
    out = original(body)
    out["choices"][0]["message"]["content"] = "Text: the cat sat"
    return out

  server.reply = echo_reply
  try:
    cfg = _cfg(run, str(root / "store"), llm=f"openai:{server.base_url}#tiny", num_latents=1)
    lat = run_autointerp(cfg)["joint"]["latents"][0]
    # Explanation parsed from the echo; every score answer malformed: 3 * (2 + 2) failures, which
    # count against the latent (a zero), unlike failed requests (unscored).
    assert lat["failed_answers"] == 12 and lat["scored"]
    assert lat["fuzz_balanced_accuracy"] == 0.0 and lat["detection_balanced_accuracy"] == 0.0
  finally:
    server.close()


def test_user_errors(world, tmp_path):
  root, _ = world
  with pytest.raises(UserError, match="missing cfg.json"):
    run_autointerp(_cfg(str(tmp_path / "nope"), str(root / "store")))
  run = str(tmp_path / "run")
  util.make_run(run)
  with pytest.raises(UserError, match="firing at least"):
    run_autointerp(_cfg(run, str(root / "store"), num_tokens=3, llm="openai:http://127.0.0.1:9#m"))
  with pytest.raises(UserError, match="num_score"):
    _cfg(run, str(root / "store"), num_score=1)
  with pytest.raises(UserError, match="llm_model"):
    _cfg(run, str(root / "store"), llm_base_url="http://127.0.0.1:9/v1")
  with pytest.raises(UserError, match="concurrency"):
    _cfg(run, str(root / "store"), concurrency=-1)


def test_backend_dependent_defaults():
  http = AutointerpConfig(run_dir="r", activations="a", llm_base_url="http://h:1/v1", llm_model="m")
  assert http.llm_spec == "openai:http://h:1/v1#m" and not http.is_local
  r = http.resolve()
  assert (r.max_examples, r.num_score, r.num_negative, r.concurrency) == (40, 50, 50, 8)
  assert r.scorer_counts() == {"strength": (50, 50), "fuzz": (50, 50), "detection": (50, 50)}
  assert r.pool_top >= r.min_examples == 40 + 25
  local = AutointerpConfig(run_dir="r", activations="a", detection_negative=7).resolve()
  assert (local.max_examples, local.concurrency) == (8, 1)
  assert local.scorer_counts() == {"strength": (5, 5), "fuzz": (5, 5), "detection": (5, 7)}


class _Hostile:
  """An LLM whose explanations carry markup: a script, an event handler, a javascript: link, a table pipe."""
  name = "hostile`llm <b>"
  EXPLANATION = ("<script>alert(1)</script> <img src=x onerror=alert(2)> [click](javascript:alert(3)) "
                 "| a | b | **bold**\n# heading")

  def complete(self, messages, max_tokens, choices=()):
    from metasae_jax.autointerp.backends import Completion  # pylint: disable=g-import-not-at-top
    content = messages[-1]["content"]
    if "How strongly" in content:
      return Completion("5", {}, None)
    if "yes or no" in content:
      return Completion("yes", {}, None)
    return Completion("Explanation: " + self.EXPLANATION, {}, None)


def test_markdown_pages_show_llm_text_as_text(world, tmp_path):
  """explanations.md and report.md escape what the LLM wrote: rendered, no tag, handler or link survives."""
  markdown = pytest.importorskip("markdown")
  root, _ = world
  run = str(tmp_path / "run")
  util.make_run(run)
  run_autointerp(_cfg(run, str(root / "store")), backend=_Hostile())
  for page in ("explanations.md", "report.md"):
    with open(os.path.join(run, "autointerp", page)) as f:
      text = f.read()
    html = markdown.markdown(text, extensions=["tables"])
    for active in ("<script", '<img src="x"', "onerror=\"", 'href="javascript', "<b>", "<h1>heading"):
      assert active not in html, (page, active)
  with open(os.path.join(run, "autointerp", "explanations.md")) as f:
    text = f.read()
  # Every explanation is one line of its pair's list, its characters shown as entities or escapes.
  assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4 and "onerror=alert(2)" in text
  assert "\\[click\\](javascript:alert(3)) \\| a \\| b \\| \\*\\*bold" in text
