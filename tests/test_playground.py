"""The playground page at the server's `/`, in a real headless browser (the system's Chromium driven
by Playwright): a prompt typed into the page streams its answer and CLS trace, and what the page
shows (answer, verdict, trace points, refusal mark) is what the API returns for the same request.

Chromium comes from the OS packages (`.ci/run` installs it); without it this test fails, unless
CLSALIGN_SKIP_BROWSER=1 says to skip it.
"""

import os
import shutil

import httpx2 as httpx
import pytest
from serve_utils import BENIGN, HARMFUL

CHROMIUM = os.environ.get("CLSALIGN_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]


@pytest.fixture(scope="module")
def page(tiny_server, tmp_path_factory):
  if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    if os.environ.get("CLSALIGN_SKIP_BROWSER") == "1":
      pytest.skip("CLSALIGN_SKIP_BROWSER=1 and no Chromium")
    pytest.fail(
      f"{CHROMIUM} not found: install the OS package (apt-get install chromium) or set CLSALIGN_SKIP_BROWSER=1"
    )
  from playwright.sync_api import sync_playwright  # noqa: PLC0415

  with sync_playwright() as p:
    context = p.chromium.launch_persistent_context(
      str(tmp_path_factory.mktemp("chromium_profile")),  # a fresh user-data-dir
      executable_path=CHROMIUM,
      headless=True,
      args=FLAGS,
    )
    try:
      pg = context.new_page()
      pg.goto(tiny_server[0] + "/")
      pg.wait_for_selector("body[data-ready='1']", timeout=30_000)
      yield pg
    finally:
      context.close()


def api_answer(url: str, prompt: str, max_tokens: int) -> dict:
  body = {
    "model": "tiny",
    "messages": [{"role": "user", "content": prompt}],
    "max_tokens": max_tokens,
    "temperature": 0,
    "seed": 0,
    "clsalign": {"trace": True},
  }
  r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
  r.raise_for_status()
  return r.json()["choices"][0]


@pytest.mark.parametrize("prompt", [BENIGN, HARMFUL])
def test_playground_streams_answer_trace_and_verdict(tiny_server, page, prompt):
  page.fill("#prompt", prompt)
  page.fill("#max_tokens", "16")
  page.click("#send")
  page.wait_for_selector("body[data-done='1']", timeout=60_000)
  api = api_answer(tiny_server[0], prompt, 16)
  v = api["clsalign"]
  assert page.inner_text("#answer") == api["message"]["content"]
  assert int(page.get_attribute("body", "data-deltas")) > 1  # it came in piece by piece
  verdict = page.locator("#verdict")
  assert verdict.get_attribute("data-malicious") == str(v["malicious"]).lower()
  assert v["malicious"] == (prompt == HARMFUL)  # the tiny run's head is calibrated so
  assert float(verdict.get_attribute("data-p")) == pytest.approx(v["p_malicious"], abs=1e-5)
  assert ("malicious" if v["malicious"] else "benign") in verdict.inner_text()
  # One trace point for the prompt-time judgement and one per re-classification, at the API's values.
  points = page.locator("#trace circle.pt")
  assert points.count() == 1 + len(v["trace"])
  drawn = sorted(float(points.nth(i).get_attribute("data-p")) for i in range(points.count()))
  assert drawn == pytest.approx(sorted([v["p_malicious"]] + [e["p_malicious"] for e in v["trace"]]), abs=1e-5)
  assert verdict.get_attribute("data-refusal") == str(v["refusal_inserted"]).lower()
  if v["refusal_inserted"]:
    assert page.inner_text("#answer .refusal") == api["message"]["content"][v["refusal_char"] :]
    assert page.locator("#refusal-mark").count() == 1
  else:
    assert page.locator("#answer .refusal").count() == 0


def test_playground_shows_bad_input_errors(page):
  page.fill("#prompt", "   ")
  page.click("#send")
  page.wait_for_selector("body[data-done='error']", timeout=30_000)
  assert "empty" in page.inner_text("#status")
