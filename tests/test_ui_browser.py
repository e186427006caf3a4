"""`breedlabel ui` in a real browser: the test starts the page on 127.0.0.1 (a subprocess on a
free port) and drives it with headless Debian Chromium through Playwright.

Screenshots go to test-artifacts/ (gitignored) for a person to look at. Skips, saying why,
when /usr/bin/chromium or the playwright package is absent (`make system-deps` installs it).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fixtures.waiting import stop_process, url_answers, wait_until

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("BREEDLABEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 180
ANSWER_TIMEOUT_MS = 90_000

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"{CHROMIUM} is absent: install Debian chromium (`make system-deps`) to run the browser "
                "tests", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    wait_until(url_answers(url), what=f"breedlabel ui up on {url}", timeout_s=START_TIMEOUT_S, every_s=0.5,
               proc=proc, describe=lambda: log_path.read_text()[-4000:])


@pytest.fixture(scope="module")
def site(tiny_bundle, tmp_path_factory):
    """The page with examples and a preset label output; yields its URL and the inputs."""
    from tests.fixtures.images import make_synthetic_dataset
    from tests.fixtures.label_output import write_label_output

    root = tmp_path_factory.mktemp("ui_site")
    examples = make_synthetic_dataset(root / "examples", num_classes=4, images_per_class=2, size=64)
    photos = sorted(str(p) for p in examples.rglob("*.jpg"))
    notes = root / "notes.txt"
    notes.write_text("definitely not a picture\n")
    rows = [(p, None, None) for p in photos] + [(str(notes), None, "not an image")]
    labels = write_label_output(root / "labels", rows)
    port = _free_port()
    log_path = root / "ui.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jobs.cli", "ui", "--model", str(tiny_bundle), "--host", "127.0.0.1",
           "--port", str(port), "--examples", str(examples), "--runs", str(labels), "--min-prob", "0.6"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_up(url, proc, log_path)
        yield {"url": url, "photos": photos, "notes": notes, "labels": labels}
    finally:
        stop_process(proc, timeout_s=20)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    """A fresh tab on the page; fails the test if the page asked any host but 127.0.0.1."""
    ARTIFACTS.mkdir(exist_ok=True)
    pg = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside: list[str] = []
    pg.on("request", lambda r: outside.append(r.url)
          if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    pg.set_default_timeout(ANSWER_TIMEOUT_MS)
    pg.goto(site["url"])
    pg.wait_for_selector("#photo-upload input[type=file]", state="attached")
    yield pg
    pg.close()
    assert outside == [], f"the page reached outside 127.0.0.1: {outside[:5]}"


def _upload(pg, path: str | Path) -> str:
    pg.set_input_files("#photo-upload input[type=file]", str(path))
    pg.wait_for_function("() => !document.querySelector('#verdict').innerText.includes('Drop a photo')")
    return pg.inner_text("#verdict")


def _top3(pg) -> list[tuple[str, str]]:
    sets = pg.locator("#top3 [data-testid$='-confidence-set']")
    return [(sets.nth(i).locator("dt").inner_text().strip(), sets.nth(i).locator("dd").inner_text().strip())
            for i in range(sets.count())]


def test_upload_photo_shows_top3(page, site, tiny_bundle):
    from core.predict import Predictor

    photo = site["photos"][0]
    verdict = _upload(page, photo)
    page.wait_for_selector("#top3 [data-testid$='-confidence-set'] >> nth=2")
    top3 = _top3(page)
    page.screenshot(path=str(ARTIFACTS / "ui_classify.png"), full_page=True)

    expected = Predictor(str(tiny_bundle)).predict_paths([photo])[0].predictions
    assert [name for name, _ in top3] == [p.breed.replace("_", " ") for p in expected]
    for (_, shown), p in zip(top3, expected):
        assert re.fullmatch(r"\d+%", shown) and abs(int(shown[:-1]) - 100 * p.prob) <= 1
    assert expected[0].breed.replace("_", " ") in verdict


def test_non_image_upload_shows_error(page, site):
    verdict = _upload(page, site["notes"])
    page.screenshot(path=str(ARTIFACTS / "ui_not_an_image.png"), full_page=True)
    assert "Not a photo" in verdict and "notes.txt" in verdict and "not an image" in verdict
    assert _top3(page) == []


def test_example_click_classifies(page):
    page.locator("#examples .thumbnail-item").first.click()
    page.wait_for_function("() => !document.querySelector('#verdict').innerText.includes('Drop a photo')")
    page.wait_for_selector("#top3 [data-testid$='-confidence-set'] >> nth=2")
    assert len(_top3(page)) == 3


def test_runs_tab_shows_manifest_histogram_and_errors(page, site):
    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-load")
    page.wait_for_function("() => (document.querySelector('#runs-status')?.innerText || '').includes('finished run')")
    page.wait_for_selector("text=notes.txt")
    page.wait_for_selector("#breed-histogram canvas, #breed-histogram svg")
    for gallery in ("#unsure-gallery", "#error-gallery"):
        page.locator(gallery).scroll_into_view_if_needed()
        page.wait_for_function(f"() => [...document.querySelectorAll('{gallery} img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "ui_runs.png"), full_page=True)
    status = page.inner_text("#runs-status")
    assert "1 finished run(s), 9 rows" in status and "1 errors" in status
    assert page.locator("text=20250101T000000Z-abcdef").count() >= 1  # the manifest row
    assert page.locator("text=not an image").count() >= 1
    assert page.locator("#unsure-gallery img").count() >= 1, "least-sure rows come with thumbnails"
    assert page.locator("#error-gallery img").count() == 1
