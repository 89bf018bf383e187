"""The try-it page at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Never lets Playwright download a browser: it must use the system one, which ``.ci/system-packages``
installs. A missing browser FAILS this test (it is an acceptance test of the page).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from serve_fixtures import make_adapters, make_clips, start_server, stop_server
from audiopetl.experiments.inference import predict_files

CHROMIUM = os.environ.get("AUDIOPETL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTEFACTS = Path(os.environ.get("AUDIOPETL_TEST_ARTEFACTS", Path(__file__).parents[1] / "test-artefacts"))


def test_page_classifies_an_uploaded_wav(tmp_path):
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).is_file(), (
        f"no Chromium at {CHROMIUM}: install Debian's `chromium` (.ci/system-packages does) or set AUDIOPETL_CHROMIUM"
    )
    from playwright import sync_api  # the test extra installs it; its own browser download is never used
    adapters = make_adapters(tmp_path)
    clip = make_clips(tmp_path / "clips")[2]  # noise.flac: a 22.05 kHz FLAC
    expected = predict_files(adapters["adapter"], [clip], top_k=3, device="cpu")[0]
    process, url = start_server([f"{name}={path}" for name, path in adapters.items()], tmp_path / "server.log")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#task option[value=adapter]", state="attached")
                page.select_option("#task", "adapter")
                page.fill("#topk", "3")
                page.set_input_files("#file", str(clip))
                page.wait_for_selector(".row", timeout=60_000)
                assert page.inner_text("#top-label") == f"{clip.name}: {expected['label']}"
                labels = page.locator(".row .label").all_inner_texts()
                assert labels == [entry["label"] for entry in expected["top_k"]]
                scores = page.locator(".row .score").all_inner_texts()
                assert scores == [f"{entry['score']:.3f}" for entry in expected["top_k"]]
                assert page.inner_text("#error") == ""
                ARTEFACTS.mkdir(parents=True, exist_ok=True)
                screenshot = page.screenshot(path=str(ARTEFACTS / "serve_page.png"), full_page=True)
                assert len(screenshot) > 1000
            finally:
                browser.close()
    finally:
        stop_server(process)
