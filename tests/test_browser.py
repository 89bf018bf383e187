"""The server's pages in a real headless Chromium (Debian's ``chromium``, driven by Playwright):
the try-it page at ``/``, and the API docs at ``/docs`` with every other host cut off.

Never lets Playwright download a browser: it must use the system one, which ``.ci/system-packages``
installs. A missing browser FAILS this test (it is an acceptance test of the page).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from serve_fixtures import METHODS, make_adapter, make_adapters, make_clips, start_server, stop_server
from audiopetl.experiments.inference import predict_files

CHROMIUM = os.environ.get("AUDIOPETL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTEFACTS = Path(os.environ.get("AUDIOPETL_TEST_ARTEFACTS", Path(__file__).parents[1] / "test-artefacts"))


def launch(playwright):
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).is_file(), (
        f"no Chromium at {CHROMIUM}: install Debian's `chromium` (.ci/system-packages does) or set AUDIOPETL_CHROMIUM"
    )
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def test_page_classifies_an_uploaded_wav(tmp_path):
    from playwright import sync_api  # the test extra installs it; its own browser download is never used
    adapters = make_adapters(tmp_path)
    clip = make_clips(tmp_path / "clips")[2]  # noise.flac: a 22.05 kHz FLAC
    expected = predict_files(adapters["adapter"], [clip], top_k=3, device="cpu")[0]
    process, url = start_server([f"{name}={path}" for name, path in adapters.items()], tmp_path / "server.log")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
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


def test_api_docs_render_with_no_other_host_reachable(tmp_path):
    """As on an air-gapped machine: every request to a host other than the server's is aborted."""
    from playwright import sync_api

    adapter = make_adapter(tmp_path / "adapter.safetensors", METHODS["adapter"], seed=0)
    process, url = start_server([str(adapter)], tmp_path / "server.log")
    server = urlsplit(url).netloc
    elsewhere: list[str] = []  # every request the pages tried to send to another host

    def only_the_server(route):
        if urlsplit(route.request.url).netloc == server:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    try:
        paths = sorted(httpx.get(f"{url}/openapi.json").json()["paths"])
        assert "/v1/tasks/{task}/classify" in paths
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                context = browser.new_context()
                context.route(lambda address: not address.startswith(("data:", "blob:")), only_the_server)
                page = context.new_page()
                failed = []
                page.on("requestfailed", lambda request: failed.append(request.url))

                page.goto(url + "/docs")  # returns once the page's scripts and styles are loaded (or failed)
                assert elsewhere == [], f"/docs asked other hosts for {elsewhere}"
                page.wait_for_selector(".opblock-summary-path", timeout=60_000)
                shown = page.locator(".opblock-summary-path").evaluate_all("nodes => nodes.map(n => n.dataset.path)")
                assert sorted(shown) == paths  # every operation of the schema, rendered by Swagger UI
                assert "audiopetl" in page.inner_text(".info .title")
                page.click(".opblock-summary-path[data-path='/v1/tasks/{task}/classify']")  # the operation opens
                page.wait_for_selector(".opblock-body tr[data-param-name=top_k]")
                icon = urljoin(page.url, page.get_attribute("link[rel~=icon]", "href"))  # headless Chromium skips it
                assert urlsplit(icon).netloc == server and httpx.get(icon).headers["content-type"] == "image/png"

                page.wait_for_load_state("networkidle")  # whatever the rendered page fetches, it has asked for
                assert elsewhere == [] and failed == [], (elsewhere, failed)
                ARTEFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTEFACTS / "serve_docs.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop_server(process)
