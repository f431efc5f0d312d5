"""The page's part of a profile's life (issue 20) in headless Chromium: "Add to my profile" twice, the history
list, and restoring a version from it; through the gateway and a real toy server (tests/test_web_browser.py's
fixtures)."""

from __future__ import annotations

import test_web_browser
from test_web_browser import Page

from viper_client import ViperClient

server, gateway, browser, artifacts = (test_web_browser.server, test_web_browser.gateway, test_web_browser.browser,
                                       test_web_browser.artifacts)
USER = "browser-history"


def rate(page: Page, index: int, rating: str, comment: str) -> None:
    card = page.find_all("#gallery .card")[index]
    card.find_element(page.By.CSS_SELECTOR, ".like" if rating == "liked" else ".dislike").click()
    card.find_element(page.By.CSS_SELECTOR, ".comment").send_keys(comment)


def history(page: Page) -> list[str]:
    return page.driver.execute_script(
        "return [...document.querySelectorAll('#history li')].map((li) => li.dataset.version)")


def test_add_more_images_then_restore_from_the_history(browser, gateway, server, artifacts):
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, artifacts)
    browser.get(gateway.url)
    page.until("document.body.dataset.ready === 'true'")
    page.find("#user-id").send_keys(USER, Keys.ENTER)
    page.until("document.getElementById('profile-meta').textContent.includes('No profile for')")

    rate(page, 0, "liked", "the warm light")
    rate(page, 1, "disliked", "too grey")
    page.find("#add-ratings").click()  # no profile yet: AddRatings creates it
    page.until("document.getElementById('profile-meta').dataset.version === '1'")
    rate(page, 2, "liked", "such a soft palette")
    page.find("#add-ratings").click()
    page.until("document.getElementById('profile-meta').dataset.version === '2'")
    page.until("document.querySelectorAll('#history li').length === 2")
    assert history(page) == ["2", "1"]
    with ViperClient(server.target) as client:
        assert [image.comment for image in client.get_profile(USER).images] == [
            "the warm light", "too grey", "such a soft palette"]
    page.screenshot("history-01-added", "#profile")

    page.find("#history li[data-version='1'] .restore").click()
    page.until("document.getElementById('profile-meta').dataset.version === '3'")
    page.until("document.querySelectorAll('#history li').length === 3")
    assert history(page) == ["3", "2", "1"]
    assert "restore" in page.find("#history li[data-version='3']").text
    with ViperClient(server.target) as client:
        assert len(client.get_profile(USER).images) == 2
    page.screenshot("history-02-restored", "#profile")
    assert page.errors() == [] and page.console_errors() == []
