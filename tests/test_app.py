"""The web app: its logic without a browser, its API through gradio_client, and a real headless Chromium."""

import math
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from taxadiffusion.app import Explorer, build_app, offline_theme
from taxadiffusion.pipeline import TaxaDiffusionPipeline

CLARKII = "Amphiprion clarkii (species, Actinopterygii › Perciformes › Pomacentridae › Amphiprion)"
FAST = dict(scheduler="ddim", steps=2, guidance="taxonomic", scale=3.0)


@pytest.fixture(scope="module")
def explorer(tiny_pipeline):
    pipe = TaxaDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return Explorer(pipe)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(explorer, monkeypatch_module):
    """The app launched on a free local port, analytics off."""
    monkeypatch_module.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    port = free_port()
    app = build_app(explorer)
    app.queue()
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        ssr_mode=False,
        quiet=True,
        theme=offline_theme(),
    )
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_search_browse_and_lineage(explorer):
    assert explorer.search("amphiprion")[0].startswith("Amphiprion (genus")  # the exact name first
    assert CLARKII in explorer.search("clarkii")
    assert explorer.search("Amphiprion clarkii") == [CLARKII]
    assert explorer.search("Amphiprion clarki")  # no substring: close matches instead
    assert explorer.search("zzzz") == []
    classes = explorer.children(None)
    assert [c.split(" (")[0] for c in classes] == ["Actinopterygii", "Elasmobranchii"]
    genera = explorer.children("Pomacentridae (family, Actinopterygii › Perciformes)")
    assert [g.split(" (")[0] for g in genera] == ["Amphiprion", "Chromis"]
    assert "| genus | Amphiprion |" in explorer.lineage_markdown(CLARKII)
    assert explorer.condition_ranks(CLARKII)[-1] == "specific_epithet"


def test_generate_is_seeded_per_image_and_strip_goes_coarse_to_fine(explorer):
    two = explorer.generate(CLARKII, None, 2, seed=5, **FAST)
    again = explorer.generate(CLARKII, None, 1, seed=6, **FAST)
    np.testing.assert_array_equal(np.asarray(two[1]), np.asarray(again[0]))  # image i uses seed + i
    strip = explorer.rank_strip(CLARKII, seed=5, **FAST)
    assert [caption for _, caption in strip] == [
        "class: Actinopterygii",
        "order: Perciformes",
        "family: Pomacentridae",
        "genus: Amphiprion",
        "specific_epithet: clarkii",
    ]
    np.testing.assert_array_equal(np.asarray(strip[-1][0]), np.asarray(two[0]))  # same seed, full lineage


def test_errors_are_messages(explorer):
    with pytest.raises(ValueError, match="choose a taxon first"):
        explorer.generate("", None, 1, seed=0, **FAST)
    with pytest.raises(ValueError, match="did you mean"):
        explorer.generate("Amphiprion clarki", None, 1, seed=0, **FAST)
    genus = explorer.search("Orectolobus")[0]
    with pytest.raises(ValueError, match="no specific_epithet"):
        explorer.generate(genus, "specific_epithet", 1, seed=0, **FAST)
    with pytest.raises(ValueError, match="between 1 and 16"):
        explorer.generate(CLARKII, None, 0, seed=0, **FAST)
    with pytest.raises(ValueError, match="guidance window"):
        explorer.generate(CLARKII, None, 1, seed=0, window_start=0.8, window_end=0.2, **FAST)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("seed", 2**64, "seed must be between 0 and"),
        ("seed", 1e300, "seed must be between 0 and"),
        ("seed", -1, "seed must be between 0 and"),
        ("seed", 2.5, "seed must be a whole number"),
        ("seed", math.nan, "seed must be a whole number"),
        ("n", math.inf, "number of images must be a whole number"),
        ("n", 17, "number of images must be between 1 and 16"),
        ("steps", 1e9, "steps must be between 1 and 1000"),
        ("scale", math.inf, "scale must be a finite number"),
        ("scale", -1.0, r"scale must be in \[0"),
    ],
)
def test_out_of_range_numbers_are_answered_with_the_reason(explorer, field, value, says):
    """What a form or an API call may send: answered with one reason, never an unexplained error."""
    request = {"n": 1, "seed": 0, **FAST, field: value}
    n, seed = request.pop("n"), request.pop("seed")
    with pytest.raises(ValueError, match=says):
        explorer.generate(CLARKII, None, n, seed, **request)


def test_gradio_client_drives_every_endpoint(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/search", "/lineage", "/generate"}
    matches = client.predict("Amphiprion clarkii", api_name="/search")
    assert matches == [CLARKII]
    assert "| family | Pomacentridae |" in client.predict(CLARKII, api_name="/lineage")
    gallery, strip = client.predict(
        CLARKII, "genus", 3, 0, "taxonomic", 3.0, 0.0, 1.0, "ddim", 2, "trailing", api_name="/generate"
    )
    assert len(gallery) == 3 and all(Path(item["image"]).is_file() for item in gallery)
    assert [item["caption"] for item in strip][-1] == "specific_epithet: clarkii"
    with pytest.raises(AppError, match="choose a taxon first"):  # an error shown as a message, not a traceback
        client.predict("", None, 1, 0, "taxonomic", 3.0, 0.0, 1.0, "ddim", 2, "trailing", api_name="/generate")


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver; `make test` installs them")
    return browser, driver


def test_in_a_headless_browser(served, tmp_path):
    """Search a taxon, generate, wait for the gallery, and keep a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(served)
        search = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#search textarea, #search input")))
        selected = "#selected-taxon textarea, #selected-taxon input"

        typed = -math.inf  # when the search was last typed

        def search_until_selected(d) -> bool:
            nonlocal typed
            if d.find_element(By.CSS_SELECTOR, selected).get_attribute("value") == CLARKII:
                return True
            # Typed at once, then again while nothing is selected: keys typed before the page's event handlers
            # are attached are lost (one clean-clone run timed out with a single try). Not at every poll: on a
            # loaded machine an answer takes longer than a poll, and typing over it raced it (another run timed
            # out retyping every 5 s beside a training job).
            if time.monotonic() - typed >= 20:
                search.clear()
                search.send_keys("Amphiprion clarkii", Keys.ENTER)
                typed = time.monotonic()
            return False

        WebDriverWait(driver, 120, poll_frequency=5).until(search_until_selected)
        wait.until(lambda d: "Pomacentridae" in d.find_element(By.ID, "lineage").text)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 4)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rank-strip img")) >= 5)
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_launch_and_command_errors(tiny_pipeline, tmp_path, capsys, monkeypatch):
    import urllib.request

    from taxadiffusion.app import launch
    from taxadiffusion.cli import main

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    assert main(["app", "--model", str(tmp_path)]) == 2
    assert "not a saved pipeline" in capsys.readouterr().err
    port = free_port()
    app = launch(tiny_pipeline, port=port, device="cpu", prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and "taxadiffusion explorer" in page.read().decode()
    finally:
        app.close()
