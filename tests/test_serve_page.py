"""The attention viewer end to end: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) loads the page from a server on loopback, translates a sentence and draws a heatmap.

Skipped only where no browser is installed outside CI; in CI (`CI` set) a missing browser is a failure,
since .ci/run installs it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from transformer.serve import create_app, running_server
from transformer.translate import Translator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# Non-white pixels inside the heatmap's cell area, counted by the page's own canvas.
COUNT_INK = """
const canvas = document.getElementById('heatmap');
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i + 3] > 0 && (data[i] < 250 || data[i + 1] < 250 || data[i + 2] < 250)) ink++;
}
return [ink, canvas.width, canvas.height];
"""


# Starts of the browser tried before the fixture fails. Chromium's start is the one step here that
# depends on the machine rather than on our code: on a loaded CI runner it once died before it spoke to
# chromedriver ("DevToolsActivePort file doesn't exist"), and the next test's start then worked.
BROWSER_STARTS = 3


@pytest.fixture
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "headless Chromium needs the chromium and chromium-driver packages"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, which .ci/run installs")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.common.exceptions import SessionNotCreatedException
    from selenium.webdriver.chrome.service import Service

    for attempt in range(1, BROWSER_STARTS + 1):
        # A profile of its own per start, and DevTools over a pipe rather than a port announced in a
        # file: neither can be left half-written by an earlier start.
        profile = tmp_path_factory.mktemp("chromium-profile")
        log = profile.parent / f"{profile.name}-chromedriver.log"
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--window-size=1100,1400",
        ):
            options.add_argument(argument)
        try:
            driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(log)), options=options)
            break
        except SessionNotCreatedException as error:
            if attempt == BROWSER_STARTS:
                tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                pytest.fail(
                    f"Chromium did not start in {BROWSER_STARTS} tries: {error.msg}\n" + "\n".join(tail)
                )
    yield driver
    driver.quit()


def test_page_translates_and_draws_attention(run_dir: Path, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    translator = Translator.from_checkpoint(run_dir)
    sentence = "Zwei Hunde spielen im Schnee."
    expected = translator.translate([sentence], beam=2)[0]
    with running_server(create_app(translator)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_element(By.ID, "beam").find_elements(By.TAG_NAME, "option")) > 0)
        source = browser.find_element(By.ID, "source")
        source.clear()
        source.send_keys(sentence)
        Select(browser.find_element(By.ID, "beam")).select_by_value("2")
        browser.find_element(By.ID, "translate").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-drawn"))

        # textContent, not the rendered text: the tiny model's translations may be mostly spaces.
        shown = browser.find_element(By.ID, "translation").get_attribute("textContent")
        assert shown == (expected or "(empty)")
        rows = browser.find_elements(By.CSS_SELECTOR, "#alternatives tbody tr")
        assert len(rows) == 2
        assert rows[0].find_elements(By.TAG_NAME, "td")[1].get_attribute("textContent") == expected
        ink, width, height = browser.execute_script(COUNT_INK)
        assert width > 100 and height > 100
        assert ink > 0.05 * width * height, (ink, width, height)  # cells are drawn, not a blank canvas

        # Another kind, layer and head: the drawing follows the selection.
        Select(browser.find_element(By.ID, "kind")).select_by_value("encoder")
        Select(browser.find_element(By.ID, "head")).select_by_value("mean")
        drawn = browser.find_element(By.TAG_NAME, "body").get_attribute("data-drawn")
        assert drawn == "encoder:0:mean"
        assert browser.execute_script(COUNT_INK)[0] > 0
        browser.save_screenshot(str(tmp_path / "page.png"))

        # A blank sentence has no attention: the last one's is hidden, not left on show.
        source.clear()
        source.send_keys("   ")
        browser.find_element(By.ID, "translate").click()
        wait.until(lambda b: b.find_element(By.ID, "translation").get_attribute("textContent") == "(empty)")
        assert not browser.find_element(By.ID, "attention-panel").is_displayed()
        source.clear()
        source.send_keys(sentence)  # and a sentence again has its own
        browser.find_element(By.ID, "translate").click()
        wait.until(lambda b: b.find_element(By.ID, "attention-panel").is_displayed())
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_page_serves_an_ensemble_without_the_attention_panel(run_dir: Path, browser) -> None:
    """An ensemble has no attention to draw: the page says what it serves, hides the panel and still
    translates, with the ensemble's translation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    translator = Translator.from_checkpoints([run_dir, run_dir])
    sentence = "Zwei Hunde spielen im Schnee."
    expected = translator.translate([sentence])[0]
    with running_server(create_app(translator)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "ensemble" in b.find_element(By.ID, "model-info").get_attribute("textContent"))
        assert "× 2 (an ensemble)" in browser.find_element(By.ID, "model-info").get_attribute("textContent")
        assert not browser.find_element(By.ID, "attention-panel").is_displayed()
        source = browser.find_element(By.ID, "source")
        source.clear()
        source.send_keys(sentence)
        browser.find_element(By.ID, "translate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("textContent").endswith(" ms"))
        assert browser.find_element(By.ID, "error").get_attribute("hidden")
        shown = browser.find_element(By.ID, "translation").get_attribute("textContent")
        assert shown == (expected or "(empty)")
