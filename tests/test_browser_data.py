"""Tests for the browser's page data and page file: chosen latents, contexts vs a dense recomputation, escaping."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.browser import data as data_lib
from metasae_jax.browser import page, select
from metasae_jax.core.errors import UserError
from tests import autointerp_util as au
from tests import browser_util as bu

BATCH = 128


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return bu.make_browser_run(str(tmp_path_factory.mktemp("browser")))


def _cfg(run, **kw):
  args = dict(run_dir=run[0], activations=run[1], num_tokens=0, batch_size=BATCH, num_latents=au.N,
              num_top=5, per_quantile=2, before=6, after=2, progress=False)
  args.update(kw)
  return data_lib.BrowserConfig(**args)


@pytest.fixture(scope="module")
def built(run):
  return data_lib.build(_cfg(run))


@pytest.fixture(scope="module")
def dense(run):
  return bu.dense_acts(*run, BATCH)


def test_counts_and_contexts_match_dense_recomputation(run, built, dense):
  from metasae_jax.storage.store import open_store
  store = open_store(run[1])
  tokens = store.read_tokens(0, store.num_tokens)
  assert built["meta"]["num_tokens"] == 480
  for name in select.SAES:
    acts_TxN = dense[name]
    lats = built["saes"][name]["latents"]
    assert {str(i) for i in np.flatnonzero((acts_TxN > 0).sum(0))} <= set(lats)  # cap = width: all live ones
    for key, lat in lats.items():
      i = int(key)
      col = acts_TxN[:, i]
      assert lat["count"] == int((col > 0).sum()), (name, i)
      want_top = np.sort(col[col > 0])[::-1][:5]
      got_top = [c["acts"][c["focus"]] for c in lat["top"]]
      np.testing.assert_allclose(got_top, want_top, rtol=2e-3, atol=1e-4)
      for ctx in lat["top"] + [c for q in lat["quantiles"] for c in q["contexts"]]:
        g = ctx["end"]
        n = len(ctx["tokens"])
        window = np.arange(g - n + 1, g + 1)
        assert window[0] // au.CTX == g // au.CTX, "a window never crosses its context"
        assert ctx["tokens"] == tokens[window].tolist()
        np.testing.assert_allclose(ctx["acts"], col[window], rtol=2e-3, atol=1e-4)
        assert ctx["acts"][ctx["focus"]] > 0
        assert ctx["focus"] >= len(ctx["tokens"]) - 3  # at most `after` tokens follow the example
      q = lat["quantiles"]
      assert len(q) == 4 and all(len(b["contexts"]) <= 2 for b in q)
      assert sum(lat["histogram"]["counts"]) == lat["histogram"]["sampled"] == min(lat["count"], 256)


def test_vocab_decodes_every_shown_token(built):
  ids = {t for name in select.SAES for lat in built["saes"][name]["latents"].values()
         for c in lat["top"] for t in c["tokens"]}
  assert {str(t) for t in ids} <= set(built["vocab"])
  assert set(bu.NASTY) <= set(built["vocab"].values())
  assert built["vocab"][str(6)] == au.WORDS[0]


def test_choice_under_a_cap_keeps_splits_scored_partners_and_most_frequent(run, dense):
  cap = 9
  d = data_lib.build(_cfg(run, num_latents=cap, num_top=2, per_quantile=1))
  chosen = {name: {int(k) for k in d["saes"][name]["latents"]} for name in select.SAES}
  assert all(len(c) == cap for c in chosen.values())
  assert bu.SPLIT_SOLO in chosen["solo"] and set(bu.SPLIT_JOINT) <= chosen["joint"]
  for name, ids in bu.SCORED.items():
    assert set(ids) <= chosen[name]
    for i in ids:
      lat = d["saes"][name]["latents"][str(i)]
      assert lat["explanation"].startswith(name) and lat["fuzz_balanced_accuracy"] == 0.6
  # Partners of the split/scored latents came in with them.
  for name in select.SAES:
    for lat in d["saes"][name]["latents"].values():
      if lat["id"] in (bu.SCORED[name] + ((bu.SPLIT_SOLO,) if name == "solo" else bu.SPLIT_JOINT)):
        assert lat["partner"] in chosen[select.other(name)]
  counts = (dense["joint"] > 0).sum(0)
  assert int(np.argmax(counts)) in chosen["joint"]


def test_select_choose_is_ordered_and_capped():
  partners = select.partner_maps(np.array([0, 1, 2]), np.array([2, 0, 1]))
  order = [("solo", 0), ("joint", 2), ("joint", 0)]
  assert select.choose(order, partners, 2) == {"joint": [1, 2], "solo": [0, 1]}
  counts = {"joint": np.array([5, 0, 9]), "solo": np.array([1, 2, 3])}
  assert select.priority([], {}, counts) == [("joint", 2), ("solo", 2), ("joint", 0), ("solo", 1),
                                             ("solo", 0)]


def test_summary_and_splits_follow_the_run_files(built):
  rows = {r[0]: r[1:] for r in built["summary"]["rows"]}
  assert rows["fvu"] == [0.21, 0.2] and rows["meta_fve"] == [0.31, 0.35]
  assert "delta_ce_pct" not in rows  # absent metrics are left out
  assert rows["autointerp fuzz_spearman"] == [0.15, 0.15]
  assert built["summary"]["comparison"]["welch_p"] == 0.036
  # The evaluation's position rule travels with its numbers (the page's own skip is meta.skip_first_positions).
  assert built["summary"]["info"]["skip"] == "tokens at position t % 16 < 1 are skipped"
  assert built["splits"] == [{"solo_latent": 3, "solo_frequency": 0.1, "coverage": 0.9,
                              "matched_joint_latent": 5, "matched_cosine": 0.5,
                              "joint_partners": [{"joint_latent": 5, "cross_phi": 0.4},
                                                 {"joint_latent": 7, "cross_phi": pytest.approx(0.3)}]}]


def test_page_escapes_tokens_and_round_trips_data(built):
  html = page.render(built)
  for nasty in ('<b>&"', "<img/src", "<i>cats</i>"):
    assert nasty not in html
  assert html.count("</script>") == 2  # the data block's and the app's own
  block = re.search(r'<script id="page-data" type="application/json">(.*?)</script>', html, re.S).group(1)
  assert json.loads(block) == json.loads(json.dumps(built))
  assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
  with open(os.path.join(page.ASSETS, "app.js")) as f:
    assert "innerHTML" not in f.read()  # token text goes through textContent only


def test_page_replaces_only_its_own_index_html(built, tmp_path):
  """An index.html the browser did not write is refused byte-for-byte intact; its own earlier page is replaced."""
  foreign = tmp_path / "site"
  foreign.mkdir()
  (foreign / "index.html").write_text("<html>my notes</html>")
  with pytest.raises(UserError, match="not written by the browser"):
    page.write(built, str(foreign))
  assert (foreign / "index.html").read_text() == "<html>my notes</html>"
  own = tmp_path / "page"
  first = page.write(built, str(own))
  assert page.write(built, str(own)) == first and page.GENERATOR in open(first).read()


def test_missing_optional_files_and_bad_inputs(run, tmp_path):
  import shutil
  bare = tmp_path / "bare"
  for name in select.SAES:
    shutil.copytree(os.path.join(run[0], name), bare / name)
  d = data_lib.build(_cfg(run, run_dir=str(bare), num_latents=3, num_top=1))
  assert d["summary"] is None and d["splits"] == []
  assert all("explanation" not in lat for lat in d["saes"]["joint"]["latents"].values())
  (bare / "report.json").write_text("{oops")
  with pytest.raises(UserError, match="report.json is not valid JSON"):
    data_lib.build(_cfg(run, run_dir=str(bare)))
  shutil.rmtree(bare / "solo")
  with pytest.raises(UserError, match="no solo/"):
    data_lib.build(_cfg(run, run_dir=str(bare)))
  with pytest.raises(UserError, match="num_latents"):
    _cfg(run, num_latents=0)


def test_binary_writes_the_page_and_reports_user_errors(run, tmp_path):
  out = tmp_path / "page"
  cmd = [sys.executable, "-m", "experiments.browse", f"--run_dir={run[0]}", f"--activations={run[1]}",
         "--num_latents=4", "--num_tokens=256", "--batch_size=128", f"--out_dir={out}"]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo())
  assert res.returncode == 0, res.stderr
  assert (out / "index.html").is_file() and "wrote" in res.stdout
  res = subprocess.run(cmd[:4] + ["--activations=/nonexistent"], capture_output=True, text=True,
                       cwd=_repo())
  assert res.returncode == 1 and res.stderr.strip().startswith("error: activation store /nonexistent")
  assert "Traceback" not in res.stderr


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_page_records_the_firing_rule(run, built):
  # joint has no calibrated θ: the library default is per-token top-k; solo has θ.
  assert built["meta"]["firing_rule"] == {"joint": "topk", "solo": "threshold"}
  with pytest.raises(UserError, match="--firing"):
    _cfg(run, firing="jumprelu")
  with pytest.raises(UserError, match="no calibrated thresholds"):
    data_lib.build(_cfg(run, firing="threshold"))


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed (the Chromium test covers the page too)")
@pytest.mark.parametrize("page_skip,eval_rule", [(1, "no positions skipped"),
                                                  (0, "tokens at position t % 128 < 1 are skipped")])
def test_header_and_summary_state_their_own_position_rules(page_skip, eval_rule, tmp_path):
  """The page header says which positions the page's examples leave out; the summary says which the evaluation
  behind its numbers left out (app.js run by node on a stand-in DOM, tests/browser_header.js)."""
  page = {"title": "t", "meta": {"source": {"model": "m", "layer": 3, "site": "resid_pre"}, "num_tokens": 1234,
                                 "skip_first_positions": page_skip, "autointerp_llm": None,
                                 "firing_rule": {"joint": "threshold", "solo": "topk"}, "widths": {"joint": 8, "solo": 8}},
          "summary": {"rows": [["fvu", 0.1, 0.2]], "comparison": {}, "matching": {}, "notes": [],
                      "info": {"num_tokens": 16384, "skip": eval_rule}},
          "vocab": {}, "saes": {"joint": {"width": 8, "latents": {}}, "solo": {"width": 8, "latents": {}}}, "splits": []}
  (tmp_path / "data.json").write_text(json.dumps(page))
  app = os.path.join(_repo(), "metasae_jax", "browser", "app.js")
  out = subprocess.run([NODE, os.path.join(_repo(), "tests", "browser_header.js"), app, str(tmp_path / "data.json")],
                       capture_output=True, text=True, timeout=60, check=True)
  shown = json.loads(out.stdout)
  want = ("(its examples leave out the first 1 position(s) of each context)" if page_skip else "(every position)")
  assert f"1,234 held-out tokens streamed for this page {want}" in shown["header"]
  assert f"evaluation: 16,384 tokens, {eval_rule}" in shown["chips"]
