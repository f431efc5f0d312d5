"""The web page's best-of-N control in headless Chromium, through the gateway and a real server (toy models):
the kept images arrive best first, each captioned with the score the server's metric gives its PNG.
Needs Debian's chromium and chromium-driver, as tests/test_web_browser.py (CI never skips it)."""

from __future__ import annotations

import base64
import os
import re

import pytest

from viper_client import RatedImage, ViperClient
from viper_server.testing import ServerProcess
from viper_server.toy import evaluate
from viper_web.testing import GatewayProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
USER = "browser-best-of"


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", toy_models_dir, models="toy") as process:
        with ViperClient(process.target) as client:
            user = evaluate.held_out_users(2)[1]
            client.extract_profile(USER, [RatedImage(r.image, comment=r.comment,
                                                     rating="liked" if r.liked else "disliked")
                                          for r in evaluate.rated_in_mixed_order(user, seed=1)])
        yield process


@pytest.fixture(scope="module")
def gateway(server):
    with GatewayProcess(server.target) as process:
        yield process


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing} not found")
        pytest.skip(f"{missing} not found: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_keeps_the_best_of_n_with_their_scores(browser, gateway, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def until(script: str):
        return WebDriverWait(browser, 120, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))

    browser.get(gateway.url)
    until("document.body.dataset.ready === 'true'")
    browser.find_element(By.ID, "user-id").send_keys(USER, Keys.ENTER)
    until("document.getElementById('profile-meta').dataset.version === '1'")
    browser.find_element(By.ID, "prompt").send_keys(evaluate.GENERATION_PROMPT)
    browser.find_element(By.CSS_SELECTOR, "#generate details summary").click()
    fields = {"num-images": 2, "best-of": 4, "seed": 7, "width": 64, "height": 64, "steps": 4, "preview-every": 1}
    for field, value in fields.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    browser.find_element(By.ID, "generate-button").click()
    until("document.querySelector('#runs .run')?.dataset.state === 'done'")

    run = browser.find_element(By.CSS_SELECTOR, "#runs .run")
    assert run.get_attribute("data-label") == "strength 0.85 · best of 4"
    tiles = run.find_elements(By.CSS_SELECTOR, ".tile")
    assert len(tiles) == 2
    scores = [float(tile.get_attribute("data-score")) for tile in tiles]
    assert scores == sorted(scores, reverse=True)
    pngs = [base64.b64decode(tile.find_element(By.TAG_NAME, "img").get_attribute("src").split(",", 1)[1])
            for tile in tiles]
    with ViperClient(server.target) as client:
        expected = client.score(USER, pngs)
    for tile, score, rank in zip(tiles, expected, (1, 2)):
        caption = tile.find_element(By.TAG_NAME, "figcaption").text
        match = re.fullmatch(rf"seed (\d+) · 64×64 · profile v1 · score (\S+) \(#{rank} of 4\)", caption)
        assert match and 7 <= int(match.group(1)) <= 10, caption
        assert float(match.group(2)) == pytest.approx(score, abs=1e-4)
