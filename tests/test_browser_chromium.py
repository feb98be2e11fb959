"""The browser page in headless Chromium over file://: latent clicks, matched partner, split view, escaping, no network."""

import os

import pytest

from metasae_jax.browser import data as data_lib
from metasae_jax.browser import page as page_lib
from tests import browser_util as bu

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} missing (CI installs it: apt-get install chromium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("browser_site"))
  run_dir, store_dir = bu.make_browser_run(root)
  data = data_lib.build(data_lib.BrowserConfig(run_dir=run_dir, activations=store_dir, num_tokens=0,
                                               batch_size=128, num_latents=12, progress=False))
  return page_lib.write(data, os.path.join(run_dir, "browser")), data


@pytest.fixture
def browser_page(tmp_path):
  from playwright import sync_api  # pylint: disable=g-import-not-at-top  (requirements-test.txt)
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.errors, pg.requests = [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("request", lambda r: pg.requests.append(r.url))
    try:
      yield pg
    finally:
      context.close()
      browser.close()


def _first_context(pg, scope: str) -> str:
  return pg.locator(f"{scope} .ctx .toks").first.text_content()


def test_browse_latents_partner_and_splits(site, browser_page, tmp_path):
  path, data = site
  pg = browser_page
  pg.goto("file://" + os.path.abspath(path))
  vocab = data["vocab"]

  # The header states the page's own position rule; the summary states the evaluation's (they can differ).
  assert "(its examples leave out the first 1 position(s) of each context)" in pg.locator("#run-info").text_content()
  assert "evaluation: 480 tokens, tokens at position t % 16 < 1 are skipped" in " ".join(
      pg.locator("#summary .chip").all_text_contents())
  # Summary at the top: report.json's metrics, joint vs solo.
  assert pg.locator("#summary-table tbody tr").first.locator("td").all_text_contents()[:3] == [
      "fvu", "0.21", "0.2"]

  # Click the most frequent joint latent in the list; its top contexts are shown.
  joint = data["saes"]["joint"]["latents"]
  top_id = max(joint.values(), key=lambda l: (l["frequency"], -l["id"]))["id"]
  first = pg.locator("#latent-list li").first
  assert first.get_attribute("data-id") == str(top_id)
  other_id = pg.locator("#latent-list li").nth(1).get_attribute("data-id")
  pg.click(f"#latent-list li[data-id='{other_id}'] a")
  assert pg.evaluate("location.hash") == f"#joint/{other_id}"
  lat = joint[other_id]
  shown = pg.locator("#latent-view .contexts").first.locator(".ctx .toks").all_text_contents()
  assert shown == [bu.shown_text(c, vocab) for c in lat["top"]]
  assert pg.locator("#latent-view .hist svg rect").count() == len(lat["histogram"]["counts"])

  # Through to the matched partner in the solo SAE.
  pg.click("#latent-view a.partner-link")
  partner = str(lat["partner"])
  assert pg.evaluate("location.hash") == f"#solo/{partner}"
  solo = data["saes"]["solo"]["latents"][partner]
  assert _first_context(pg, "#latent-view") == bu.shown_text(solo["top"][0], vocab)
  assert pg.locator("#latent-list li.selected").get_attribute("data-sae") == "solo"

  # Markup-like tokens render as text, never as elements.
  assert pg.locator("#latent-view b, #latent-view img, #latent-view i").count() == 0
  texts = pg.evaluate("[...document.querySelectorAll('.tok')].map(t => t.textContent)")
  assert set(bu.NASTY) & set(texts)

  # Search by explanation text, then by id.
  pg.click(".sae-switch button[data-sae='joint']")
  pg.fill("#search", "<i>cats</i> & dogs 1")
  assert pg.locator("#latent-list li").all_text_contents()[0].startswith("#1")
  assert pg.locator("#latent-list li").count() == 1
  pg.fill("#search", str(top_id))
  assert pg.locator("#latent-list li").count() == 1
  pg.fill("#search", "")
  pg.select_option("#sort", "fuzz_spearman")
  assert pg.locator("#latent-list li").first.get_attribute("data-id") == "1"

  # The split candidate: solo latent and its joint partners side by side, with their contexts.
  pg.click("#tab-splits")
  pg.click("#split-list li a")
  cols = pg.locator("#split-view .split-col")
  assert cols.count() == 1 + len(bu.SPLIT_JOINT)
  for k, (sae, i) in enumerate([("solo", bu.SPLIT_SOLO)] + [("joint", j) for j in bu.SPLIT_JOINT]):
    col = cols.nth(k)
    assert (col.get_attribute("data-sae"), col.get_attribute("data-id")) == (sae, str(i))
    lat = data["saes"][sae]["latents"][str(i)]
    assert col.locator(".ctx .toks").all_text_contents() == [bu.shown_text(c, vocab) for c in lat["top"][:6]]

  pg.screenshot(path=str(tmp_path / "splits.png"), full_page=True)
  pg.click("#split-view .split-col[data-sae='joint'] h4 a")
  assert pg.evaluate("location.hash") == f"#joint/{bu.SPLIT_JOINT[0]}"
  pg.screenshot(path=str(tmp_path / "latent.png"), full_page=True)
  assert (tmp_path / "latent.png").stat().st_size > 0

  assert pg.errors == []
  assert all(u.startswith(("file:", "data:", "about:")) for u in pg.requests), pg.requests
