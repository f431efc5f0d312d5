"""The ViPer web page end to end in headless Chromium: a whole session through the gateway and a real server.

Rate and comment the 16 example images, extract, edit a feature (and meet a version conflict), generate 2
images watching progress and previews arrive before the final images, cancel a generation (the server stops
denoising at once), score 2 images, see a readable error. Each stage leaves a screenshot in the folder the
test prints. Needs Debian's chromium and chromium-driver (.ci/run installs them; CI never skips this test).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from viper_client import ViperClient
from viper_server.testing import ServerProcess
from viper_web.testing import GatewayProcess

from fixture_data import FIXTURES, QUERIES

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "web" / "viper_web" / "static" / "examples"
USER = "browser-alice"


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make install)"
    return None


@pytest.fixture(scope="module")
def artifacts(request) -> Path:
    folder = Path(os.environ.get("VIPER_TEST_ARTIFACTS", ROOT / "var" / "test-artifacts"))
    folder = folder / "web-browser" / datetime.now().strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nweb page screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", toy_models_dir, models="toy") as process:
        yield process


@pytest.fixture(scope="module")
def gateway(server):
    with GatewayProcess(server.target) as process:
        yield process


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The page as a user sees it, plus the helpers the stages share."""

    def __init__(self, driver, folder: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.folder, self.By = driver, folder, By
        self.wait = lambda timeout=60: WebDriverWait(driver, timeout, poll_frequency=0.05)

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def until(self, script: str, timeout: float = 60):
        """Waits until the JavaScript expression is truthy; returns its value."""
        return self.wait(timeout).until(lambda driver: driver.execute_script(f"return {script}"))

    def screenshot(self, name: str, section: str | None = None) -> None:
        if section:
            self.driver.execute_script(f"document.querySelector('{section}').scrollIntoView()")
            self.find(section).screenshot(str(self.folder / f"{name}.png"))
        else:
            self.driver.save_screenshot(str(self.folder / f"{name}.png"))

    def errors(self) -> list[str]:
        return [element.text for element in self.find_all("#errors .error")]

    def console_errors(self) -> list[str]:
        # Refused calls (404, 409, 400) are logged by Chromium as failed loads: they are the page's business.
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]


def fixture_comments() -> dict[str, tuple[str, str]]:
    """Example file name -> (liked|disliked, the comment written for it), matched by content."""
    comments = json.loads((FIXTURES / "comments.json").read_text())
    by_hash = {
        hashlib.sha256(path.read_bytes()).digest(): (path.parent.name, comments[f"{path.parent.name}/{path.name}"])
        for path in FIXTURES.glob("*/*.png")
    }
    return {path.name: by_hash[hashlib.sha256(path.read_bytes()).digest()] for path in EXAMPLES.glob("*.png")}


# Records, in order, each change the page makes to a generated tile: progress, the picture, the tile's state.
OBSERVE_TILES = """
window.tileEvents = [];
new MutationObserver((records) => {
  for (const record of records) {
    const tile = record.target.closest('.tile');
    if (tile) window.tileEvents.push([tile.closest('.run').dataset.label + '#' + tile.dataset.index,
                                      record.target.tagName, record.attributeName, record.oldValue]);
  }
}).observe(document.getElementById('runs'), {subtree: true, attributes: true, attributeOldValue: true,
                                              attributeFilter: ['value', 'data-kind', 'data-state']});
"""


def test_a_whole_session_in_the_browser(browser, gateway, server, artifacts):
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, artifacts)
    browser.get(gateway.url)
    page.until("document.body.dataset.ready === 'true'")
    assert len(page.find_all("#gallery .card")) == 16
    page.find("#user-id").send_keys(USER, Keys.ENTER)
    page.until("document.getElementById('profile-meta').textContent.includes('No profile for')")
    assert page.find("#recommended").text == "8"
    page.screenshot("01-start")

    # 1. Rate and comment the 16 images, as the fixture's author did.
    comments = fixture_comments()
    for card in page.find_all("#gallery .card"):
        name = card.find_element(page.By.TAG_NAME, "img").get_attribute("src").rsplit("/", 1)[1]
        rating, comment = comments[name]
        card.find_element(page.By.CSS_SELECTOR, ".like" if rating == "liked" else ".dislike").click()
        card.find_element(page.By.CSS_SELECTOR, ".comment").send_keys(comment)
    status = page.find("#rate-status").text
    assert status.startswith("8 liked · 8 disliked · 16 commented"), status
    page.find("#upload").send_keys(str(QUERIES[0]))  # an image of one's own: shown, then taken back
    upload = page.find_all("#gallery .card")[-1]
    assert len(page.find_all("#gallery .card")) == 17
    assert upload.find_element(page.By.TAG_NAME, "img").get_attribute("src").startswith("blob:")
    upload.find_element(page.By.CSS_SELECTOR, ".remove").click()
    assert len(page.find_all("#gallery .card")) == 16
    page.screenshot("02-rated", "#rate")

    # 2. Extract: the profile appears, and the server holds the images with their comments.
    page.find("#extract").click()
    page.until("document.getElementById('profile-meta').dataset.version === '1'")
    liked_chips = [chip.text for chip in page.find_all("#liked-chips .chip-text")]
    with ViperClient(server.target) as client:
        stored = client.get_profile(USER)
    assert liked_chips == list(stored.liked_features) and stored.version == 1
    assert sorted(image.comment for image in stored.images) == sorted(comment for _, comment in comments.values())
    page.screenshot("03-profile", "#profile")

    # 3. Add features, edit one, save. (The toy models may extract none from these photos: the test adds its own first.)
    page.find("#add-liked").send_keys("pastel pinks", Keys.ENTER)
    page.find("#liked-chips .chip-text").click()
    editor = page.find("#liked-chips .chip-input")
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys("soft golden light", Keys.ENTER)
    page.find("#add-disliked").send_keys("neon glare", Keys.ENTER)
    assert "Unsaved" in page.find("#profile-status").text
    page.find("#save-profile").click()
    page.until("document.getElementById('profile-meta').dataset.version === '2'")
    with ViperClient(server.target) as client:
        stored = client.get_profile(USER)
    assert stored.liked_features[0] == "soft golden light" and "neon glare" in stored.disliked_features
    page.screenshot("04-edited", "#profile")

    # 4. Someone else saves meanwhile: the page's save is refused and reloading resolves it.
    with ViperClient(server.target) as client:
        client.update_profile(USER, liked_features=["pastel colors", "soft light"], expected_version=2)
    page.find("#disliked-chips .chip-remove").click()
    page.find("#save-profile").click()
    page.until("!document.getElementById('conflict').hidden")
    assert "version 2" in page.find("#conflict-message").text
    page.screenshot("05-conflict", "#profile")
    page.find("#reload-profile").click()
    page.until("document.getElementById('profile-meta').dataset.version === '3'")
    assert [chip.text for chip in page.find_all("#liked-chips .chip-text")] == ["pastel colors", "soft light"]
    assert not page.find("#conflict").is_displayed()

    # 5. Generate 2 images, and the same seeds unpersonalized beside them: progress and previews arrive
    #    before each final image.
    page.find("#prompt").send_keys("a castle by the sea")
    set_fields(page, {"num-images": 2, "seed": 7, "width": 64, "height": 64, "steps": 4, "preview-every": 1})
    page.find("#compare").click()
    browser.execute_script(OBSERVE_TILES)
    page.find("#generate-button").click()
    page.until("document.querySelectorAll('#runs .run[data-state=\"done\"]').length === 2")
    runs = page.find_all("#runs .run")
    assert [run.get_attribute("data-label") for run in runs] == ["strength 0.85", "strength 0.00"]
    events = browser.execute_script("return window.tileEvents")
    tiles = sorted({key for key, *_ in events})
    assert tiles == ["strength 0.00#0", "strength 0.00#1", "strength 0.85#0", "strength 0.85#1"]
    for key in tiles:
        check_tile_order([(tag, name, old) for k, tag, name, old in events if k == key])
    finals = page.find_all("#runs .tile img[data-kind='final']")
    assert len(finals) == 4
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) == 64 for img in finals)
    captions = [caption.text for caption in page.find_all("#runs .tile figcaption")]
    assert captions == ["seed 7 · 64×64 · profile v3", "seed 8 · 64×64 · profile v3"] * 2
    final_sources = [img.get_attribute("src") for img in finals]
    assert final_sources[0] != final_sources[2], "the profile changes the picture"
    page.find("#compare").click()
    page.screenshot("06-generated", "#generate")

    # 6. Cancel a long generation on the page: the server stops denoising at once.
    server.logs.clear()
    set_fields(page, {"num-images": 1, "width": 256, "height": 256, "steps": 150, "preview-every": 5})
    page.find("#generate-button").click()
    page.until("(document.querySelector('#runs .run-row .tile progress')?.value || 0) >= 5 && "
               "document.querySelector('#runs .run-row .tile img[data-kind=\"preview\"]')")
    page.screenshot("07-generating", "#generate")
    shown = browser.execute_script("const step = document.querySelector('#runs .run-row .tile progress').value;"
                                   "document.getElementById('cancel').click(); return step;")
    line = server.wait_for_log(r"generation cancelled after \d+ denoising steps", timeout=30)
    steps_done = int(re.search(r"after (\d+) denoising", line).group(1))
    # The page lags the server by the events in flight; the server stopped right after the cancel reached it.
    assert shown <= steps_done < shown + 20, (shown, steps_done)
    page.until("document.getElementById('generate-status').textContent === 'Cancelled.'")
    assert page.find("#runs .run-row .run").get_attribute("data-state") == "cancelled"
    assert page.errors() == [], "a cancel is not an error"
    page.screenshot("08-cancelled", "#generate")

    # 7. Score 2 images: ranked by the user's predicted preference, as the server scores them.
    page.find("#score-files").send_keys("\n".join(str(path) for path in QUERIES))
    page.until("document.querySelectorAll('#ranking li[data-score]').length === 2")
    ranked = [(row.get_attribute("data-name"), float(row.get_attribute("data-score")))
              for row in page.find_all("#ranking li")]
    with ViperClient(server.target) as client:
        expected = client.score(USER, QUERIES)
    scores = {path.name: result for path, result in zip(QUERIES, expected)}
    assert [score for _, score in ranked] == sorted((score for _, score in ranked), reverse=True)
    for name, score in ranked:
        assert score == pytest.approx(float(scores[name]), abs=1e-9)
    page.screenshot("09-scored", "#score")

    browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 40)
    page.screenshot("10-whole-page")  # docs/web-page.jpg is this one, downsized
    browser.set_window_size(1280, 1000)

    # 8. A refused request reads as a message, not a stack trace.
    page.find("#prompt").clear()
    page.find("#generate-button").click()
    page.until("document.querySelector('#errors .error')")
    error = page.find("#errors .error")
    assert error.get_attribute("data-code") == "invalid_argument"
    assert "Generating: That request was refused" in error.text and "prompt" in error.text
    page.screenshot("11-error")

    assert page.console_errors() == []
    assert len(list(artifacts.glob("*.png"))) == 11


def set_fields(page: Page, values: dict[str, int]) -> None:
    details = page.find("#generate details")
    if not details.get_attribute("open"):
        details.find_element(page.By.TAG_NAME, "summary").click()
    for field, value in values.items():
        element = page.find(f"#{field}")
        element.clear()
        element.send_keys(str(value))


def check_tile_order(events: list[tuple[str, str, str | None]]) -> None:
    """One tile's changes, in order: progress first, then previews, and the final image last."""
    kinds = [(name, old) for tag, name, old in events if name == "data-kind"]
    progress = [i for i, (tag, name, _) in enumerate(events) if tag == "PROGRESS" and name == "value"]
    first_picture = next(i for i, (_, name, _) in enumerate(events) if name == "data-kind")
    assert progress and progress[0] < first_picture, "progress shows before any picture"
    assert kinds[0] == ("data-kind", None) and kinds[-1] == ("data-kind", "preview"), \
        "a preview first, the final image replacing a preview"
    states = [(i, old) for i, (_, name, old) in enumerate(events) if name == "data-state"]
    assert [old for _, old in states] == ["waiting", "running"], "waiting -> running -> done"
    assert states[0][0] < first_picture < states[1][0], "the tile is done only after its previews"



@pytest.fixture(scope="module")
def signed_gateway(tiny_models_dir, tmp_path_factory):
    """A server trusting the development identity provider (as `make web` sets it up), and its gateway."""
    from viper_server.dev_identity import ensure_dev_identity

    folder = tmp_path_factory.mktemp("dev-identity")
    config = ensure_dev_identity(folder)
    with ServerProcess(folder / "profiles.db", tiny_models_dir, "--auth-config", str(config)) as process:
        with GatewayProcess(process.target) as gateway:
            yield gateway, folder


def test_the_page_signs_in_with_a_users_jwt_and_refuses_a_service_token(browser, signed_gateway, artifacts):
    from viper_server.dev_identity import dev_token

    gateway, folder = signed_gateway
    page = Page(browser, artifacts)
    browser.get(f"{gateway.url}/#token={dev_token('alice', folder=folder)}")
    page.until("document.body.dataset.ready === 'true'")
    page.until("document.getElementById('profile-meta').textContent.includes('No profile for alice')")
    user = page.find("#user-id")
    assert user.get_attribute("value") == "alice" and user.get_attribute("readonly") is not None
    assert "token" not in browser.current_url  # taken out of the address at once
    assert page.errors() == []

    token = page.find("#token")
    token.clear()
    token.send_keys("a-service-token-never-belongs-in-a-page")
    browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
    page.until("document.querySelectorAll('#errors .error').length > 0")
    assert any("Not a sign-in token" in error for error in page.errors())
    assert token.get_attribute("value") == "" and user.get_attribute("readonly") is None
