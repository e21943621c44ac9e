"""A real browser (Debian's Chromium, headless, via Playwright) against a real `datasette serve`."""

import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import load_collection

CHROMIUM = os.environ.get("MAPCLIP_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("MAPCLIP_SCREENSHOTS", Path(__file__).parent / "screenshots"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_args):
    db_path, folder = load_collection(tmp_path_factory, model_args, 24)
    yield from serve(db_path, folder)


def serve(db_path, folder):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "datasette", "serve", str(db_path), "-p", str(port), "--setting", "sql_time_limit_ms", "20000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/-/versions.json", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("datasette did not start: " + process.stdout.read().decode()[-2000:])
    yield url, folder
    process.terminate()
    process.wait(timeout=10)


HOSTILE = '"><script>alert("x")</script><img src=x onerror=alert(1)>\'><svg onload=alert(2)>'
HOSTILE_URLS = ["javascript:alert(3)", " JaVaScRiPt:alert(4)", "data:text/html,<script>alert(5)</script>",
                "vbscript:msgbox(6)", "//evil.example/x"]


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, model_args):
    """A collection whose catalogue is hostile in every field the page shows, and a hostile model name."""
    import shutil

    from datasette_mapclip.store import MapStore

    db_path, folder = load_collection(tmp_path_factory, model_args, 8)
    copy = tmp_path_factory.mktemp("hostile-browser") / "maps.db"
    shutil.copy(db_path, copy)
    store = MapStore(copy)
    with store.transaction():
        for map_id, url in enumerate(HOSTILE_URLS, start=1):
            store.conn.execute(
                "UPDATE maps SET title = ?, place = ?, date = ?, notes = ?, item_url = ?, image_url = ?, "
                "thumbnail_url = ?, thumbnail = NULL WHERE id = ?",
                ("T" + HOSTILE, "P" + HOSTILE, "D" + HOSTILE, "N" + HOSTILE, url, url, url, map_id))
        store.conn.execute(
            "INSERT INTO models (name, architecture, dim, vector_table) "
            "SELECT ?, architecture, dim, vector_table || '_x' FROM models LIMIT 1", ("M" + HOSTILE,))
    store.close()
    yield from serve(copy, folder)


def test_hostile_catalogue_and_queries_run_no_script_in_a_real_browser(hostile_server, browser):
    url, _ = hostile_server
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    query = urllib.parse.urlencode({"q": "Q" + HOSTILE, "place": "P" + HOSTILE, "filter": "F" + HOSTILE,
                                    "model": "M" + HOSTILE})
    for path in ("/-/mapclip?like=1&k=8", "/-/mapclip?like=2&k=8&q=roads", "/-/mapclip?" + query,
                 "/-/mapclip/search.json?like=1&k=8"):
        page.goto(url + path)
        page.wait_for_load_state("load")
        links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        sources = page.eval_on_selector_all("img[src]", "els => els.map(e => e.src)")
        assert all(link.startswith((url + "/", "https://", "http://")) for link in links), links
        assert all(src.startswith(url + "/") for src in sources), sources
        assert not [link for link in links if "evil.example" in link]
    page.goto(url + "/-/mapclip?like=1&k=8")
    shown = page.locator(".mapclip-title").all_inner_texts()
    assert sum(title == "T" + HOSTILE for title in shown) == len(HOSTILE_URLS)  # shown as text, whole
    assert ("M" + HOSTILE) in page.locator("select[name=model] option").all_text_contents()
    for index in range(len(HOSTILE_URLS)):  # follow every title link: each is the record page
        title = page.locator(".mapclip-title").nth(index)
        navigating(page, title.click)
        assert page.url.startswith(url + "/maps/maps/"), page.url
        page.go_back()
        page.wait_for_load_state("load")
    page.mouse.wheel(0, 3000)
    page.wait_for_timeout(300)
    assert dialogs == []
    page.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} not found: the test set-up (make test) installs Debian's chromium; "
        "or point MAPCLIP_CHROMIUM at a Chromium binary"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update",
        ])
        yield browser
        browser.close()


def navigating(page, action):
    """Do something that submits the form (POST, redirect, GET) and wait for the new page."""
    with page.expect_navigation(wait_until="load"):
        action()


def result_ids(page):
    return [int(x) for x in page.locator(".mapclip-card").evaluate_all("cards => cards.map(c => c.dataset.id)")]


def api_ids(url, query):
    import json

    with urllib.request.urlopen(f"{url}/-/mapclip/search.json?{query}") as response:
        return [r["id"] for r in json.load(response)["results"]]


def test_search_page_in_a_real_browser(server, browser):
    url, folder = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{url}/-/mapclip")
    assert page.locator("text=Model:").is_visible()

    # 1. text search
    page.fill("input[name=q]", "nautical chart")
    navigating(page, lambda: page.click("button[type=submit]"))
    text_ids = result_ids(page)
    assert len(text_ids) == 20 and text_ids == api_ids(url, "q=nautical+chart")
    assert "q=nautical+chart" in page.url  # shareable
    page.mouse.wheel(0, 5000)  # thumbnails load lazily: bring them all into view
    page.wait_for_function(
        "() => [...document.querySelectorAll('.mapclip-card img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=15000)
    assert page.locator(".mapclip-card img").count() == 20

    # 2. upload an image of a map in the collection: it comes back first, alongside the text
    navigating(page, lambda: page.set_input_files("input[name=image]", str(folder / "sheet_0003.jpg")))
    assert "vector=" in page.url
    assert page.locator("text=using your uploaded image").is_visible()
    combined_ids = result_ids(page)
    assert combined_ids != text_ids

    # 3. the slider: image only, then text only
    navigating(page, lambda: page.locator("input[name=weight]").fill("-1"))
    image_only = result_ids(page)
    navigating(page, lambda: page.locator("input[name=weight]").fill("1"))
    text_only = result_ids(page)
    assert text_only == text_ids
    assert image_only != text_only
    navigating(page, lambda: page.locator("input[name=weight]").fill("0"))
    assert result_ids(page) == combined_ids  # back to the equal mix
    navigating(page, lambda: page.locator("input[name=weight]").fill("-1"))
    assert result_ids(page) == image_only == api_ids(url, page.url.split("?", 1)[1])

    # 4. more like this on an image-only result: that map comes first with similarity 1
    target = result_ids(page)[2]
    navigating(page, lambda: page.locator(f'.mapclip-card[data-id="{target}"] .mapclip-more').click())
    assert f"like={target}" in page.url
    like_ids = result_ids(page)
    assert like_ids[0] == target
    assert page.locator(".mapclip-card .mapclip-score").first.inner_text() == "1.000"
    assert like_ids == api_ids(url, f"like={target}")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.goto(f"{url}/-/mapclip?q=nautical+chart&k=12")
    page.screenshot(path=str(SCREENSHOTS / "search-page.png"), full_page=True)
    page.close()
