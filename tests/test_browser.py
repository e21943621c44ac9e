"""A real browser (Debian's Chromium, headless, via Playwright) against a real `datasette serve`."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import DATASETTE_1, load_collection, split_metadata

CHROMIUM = os.environ.get("MAPCLIP_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("MAPCLIP_SCREENSHOTS", Path(__file__).parent / "screenshots"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a publisher configures for visitors (docs/publishing.md): example searches and where to report.
PUBLISHED = {"databases": {"maps": {"plugins": {"datasette-mapclip": {
    "example_queries": ["nautical chart", "city street plan", "hand-coloured county map"], "example_map": 5,
    "report_url": "https://maps.example.org/report", "contact": "maps@example.org"}}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_args):
    db_path, folder = load_collection(tmp_path_factory, model_args, 24)
    metadata = tmp_path_factory.mktemp("published") / "metadata.json"
    metadata.write_text(json.dumps(PUBLISHED))
    yield from serve(db_path, folder, metadata)


def metadata_options(path) -> list[str]:
    """``-m metadata.json`` on Datasette 0.65; on the 1.0 alphas plugin settings and permissions
    go in a configuration file (``-c datasette.json``) beside what stays metadata."""
    if not path:
        return []
    if not DATASETTE_1:
        return ["-m", str(path)]
    metadata, config = split_metadata(json.loads(Path(path).read_text()))
    options = []
    for flag, part, name in (("-m", metadata, "metadata-1.0.json"), ("-c", config, "datasette.json")):
        if part:
            target = Path(path).with_name(name)
            target.write_text(json.dumps(part))
            options += [flag, str(target)]
    return options


def serve(db_path, folder, metadata=None):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "datasette", "serve", str(db_path), "-p", str(port), "--setting", "sql_time_limit_ms", "20000",
         *metadata_options(metadata)],
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
    metadata = copy.with_name("metadata.json")  # the hostile model is offered in the page's menu
    metadata.write_text(json.dumps({"databases": {"maps": {"plugins": {"datasette-mapclip": {
        "models_menu": ["M" + HOSTILE]}}}}}))
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
    yield from serve(copy, folder, metadata)


def test_hostile_catalogue_and_queries_run_no_script_in_a_real_browser(hostile_server, browser):
    url, _ = hostile_server
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    query = urllib.parse.urlencode({"q": "Q" + HOSTILE, "place": "P" + HOSTILE, "filter": "F" + HOSTILE,
                                    "model": "M" + HOSTILE})
    for path in ("/-/mapclip?like=1&k=8", "/-/mapclip?like=2&k=8&q=roads", "/-/mapclip?" + query,
                 "/-/mapclip/search.json?like=1&k=8", "/-/mapclip/about"):
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
    for index in range(len(HOSTILE_URLS)):  # follow every title link: each is the map's own page
        title = page.locator(".mapclip-title").nth(index)
        text = title.inner_text()
        navigating(page, title.click)
        assert page.url.startswith(url + "/-/mapclip/map/maps/"), page.url
        assert page.locator("h1").inner_text() == text  # shown as text, whole
        links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        assert all(link.startswith((url + "/", "https://", "http://")) for link in links), links
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
    assert page.locator("a.mapclip-about-link").is_visible()

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


SERIOUS = ("serious", "critical")
WIDTHS = {"desktop": (1280, 1000), "phone": (390, 844)}


def run_axe(page):
    """axe-core's violations on the page, run in an isolated world of its own (over CDP), as the axe
    browser extension and Lighthouse run it: it sees the page's DOM but none of the page's JavaScript.
    Not injected into the page's own world (axe_playwright_python's ``Axe().run``), where the page's
    scripts can break it: Datasette 1.0's ``<navigation-search>`` element (static/navigation-search.js,
    its constructor) sets ``this.matches = []``, hiding ``Element.prototype.matches`` with an array,
    and axe-core then throws ("e[to] is not a function") when it tries ``matches()`` on that element."""
    from axe_playwright_python.base import AXE_SCRIPT

    cdp = page.context.new_cdp_session(page)
    try:
        frame = cdp.send("Page.getFrameTree")["frameTree"]["frame"]["id"]
        world = cdp.send("Page.createIsolatedWorld", {"frameId": frame, "worldName": "axe"})["executionContextId"]
        for expression in (AXE_SCRIPT, "axe.run(document, {resultTypes: ['violations']})"):
            answer = cdp.send("Runtime.evaluate", {"expression": expression, "contextId": world,
                                                   "awaitPromise": True, "returnByValue": True})
            if "exceptionDetails" in answer:
                details = answer["exceptionDetails"]
                pytest.fail("axe-core failed: " + details.get("exception", {}).get("description", details["text"]))
        return answer["result"]["value"]["violations"]
    finally:
        cdp.detach()


def serious_violations(page):
    return [(v["id"], v["impact"], v["help"], [node["target"] for node in v["nodes"]][:5])
            for v in run_axe(page) if v["impact"] in SERIOUS]


def no_sideways_scroll(page):
    return page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")


def sticking_out(page):
    """Elements of the page's own content that reach past the right edge of the viewport."""
    return page.evaluate("""() => [...document.querySelectorAll('.mapclip *')]
        .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
        .map(e => e.tagName + '.' + e.className)""")


def all_thumbnails_loaded(page):
    # thumbnails load lazily (only near the viewport): load them all now, for the screenshot
    page.evaluate("() => document.querySelectorAll('.mapclip-card img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.mapclip-card img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=15000)
    page.evaluate("() => window.scrollTo(0, 0)")


@pytest.mark.parametrize("width", list(WIDTHS))
def test_search_page_passes_axe_and_fits_a_phone(server, browser, width):
    """axe-core (the rules browsers' accessibility audits use): no serious or critical violation on the
    search page with results, its empty state and the about page, at desktop and phone widths; and no
    sideways scrolling on a 390 px phone."""
    url, _ = server
    page = browser.new_page(viewport=dict(zip(("width", "height"), WIDTHS[width])))
    for path in ("/-/mapclip?q=nautical+chart&k=12", "/-/mapclip", "/-/mapclip?like=5&k=12",
                 "/-/mapclip/about?_db=maps", "/-/mapclip?like=99999", "/-/mapclip?q=chart&place=nowhere-at-all"):
        page.goto(url + path)
        page.wait_for_load_state("load")
        if page.locator(".mapclip-card img").count():
            all_thumbnails_loaded(page)
        found = serious_violations(page)
        assert not found, (path, width, found)
        scroll_width, client_width = no_sideways_scroll(page)
        assert scroll_width <= client_width, (path, width, scroll_width, client_width)
        assert not sticking_out(page), (path, width, sticking_out(page))
    page.goto(url + "/-/mapclip?q=nautical+chart&k=12")
    all_thumbnails_loaded(page)
    assert page.locator(".mapclip-card").count() == 12
    assert page.locator(".mapclip-examples a").count() == 4  # three queries and the example image
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"search-{width}.png"), full_page=True)
    page.goto(url + "/-/mapclip/about?_db=maps")
    page.screenshot(path=str(SCREENSHOTS / f"about-{width}.png"), full_page=True)
    page.close()


def test_keyboard_examples_and_the_searching_state(server, browser):
    url, _ = server
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(url + "/-/mapclip")
    assert page.evaluate("() => document.activeElement.name") == "q"  # the empty page starts in the box
    assert page.locator("text=How to search").is_visible()
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "search-empty-phone.png"), full_page=True)

    # While the model works: a status that screen readers announce (the submission is held here).
    page.evaluate("() => document.querySelector('.mapclip-form').addEventListener('submit', e => e.preventDefault())")
    page.fill("input[name=q]", "nautical chart")
    page.keyboard.press("Enter")
    status = page.locator(".mapclip-status")
    assert status.get_attribute("role") == "status" and status.get_attribute("aria-live") == "polite"
    assert status.inner_text().startswith("Searching")
    assert status.is_visible()

    # By keyboard alone: Enter in the box searches, Tab walks the form then the results in reading order,
    # and the focused element shows a visible ring.
    page.goto(url + "/-/mapclip")
    # the page puts focus in the box once it has loaded; typing before that (a busy machine) loses keys
    page.wait_for_function("() => document.activeElement && document.activeElement.name === 'q'")
    page.keyboard.type("nautical chart")
    navigating(page, lambda: page.keyboard.press("Enter"))
    assert page.input_value("input[name=q]") == "nautical chart"
    assert result_ids(page) == api_ids(url, "q=nautical+chart")
    # the answer takes focus; from the search box, Tab walks the rest of the form, then the results
    assert page.evaluate("() => document.activeElement.id") == "mapclip-results-heading"
    page.focus("input[name=q]")
    order = [["INPUT", "q", None, "", ""]]
    for _ in range(40):
        page.keyboard.press("Tab")
        focused = page.evaluate("""() => { const e = document.activeElement; const s = getComputedStyle(e);
            return [e.tagName, e.name || e.className || '', e.closest('.mapclip-card') ? e.closest('.mapclip-card').dataset.id : null,
                    s.outlineStyle, s.outlineWidth]; }""")
        order.append(focused)
        if focused[0] == "A" and "mapclip" in focused[1] or focused[2]:
            assert focused[3] != "none" and focused[4] != "0px", focused  # visible focus
    names = [f[1] for f in order]
    assert names.index("q") < names.index("image") < names.index("weight")  # the form first, in order
    cards = [f[2] for f in order if f[2]]
    first_card = str(result_ids(page)[0])
    assert cards[:4] == [first_card] * 4  # picture, title, more like this, record: one card at a time

    # The slider moved by keyboard waits for Enter instead of reloading at every key.
    page.focus("input[name=weight]")
    page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(300)
    assert "weight" not in page.url
    assert "Press Enter" in page.locator(".mapclip-status").inner_text()
    navigating(page, lambda: page.keyboard.press("Enter"))
    assert "weight=-0.1" in page.url

    # The example searches: one click each.
    navigating(page, lambda: page.locator(".mapclip-examples a", has_text="city street plan").click())
    assert "q=city+street+plan" in page.url and result_ids(page) == api_ids(url, "q=city+street+plan")
    navigating(page, lambda: page.locator(".mapclip-example-map").click())
    assert "like=5" in page.url and result_ids(page)[0] == 5
    navigating(page, lambda: page.locator("a.mapclip-about-link").click())
    assert page.url.endswith("/-/mapclip/about?_db=maps")
    assert page.locator("a", has_text="Report a problem").get_attribute("href") == "https://maps.example.org/report"
    page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
def test_a_first_visit_sees_each_answer_come_into_view(server, browser, width):
    """At a desktop and a phone width: after a search the results' heading is on screen and focused
    (the first result a few Tab presses on); a bad upload's error is on screen and focused; the uploaded
    picture is shown back; the last page offers no "Next"."""
    url, folder = server
    w, h = WIDTHS[width]
    page = browser.new_page(viewport={"width": w, "height": h})
    page.goto(f"{url}/-/mapclip")
    page.fill("input[name=q]", "nautical chart")
    navigating(page, lambda: page.click("button[type=submit]"))
    # (scrolled to the top edge, a box may sit a fraction of a pixel above it)
    on_screen = "el => { const r = el.getBoundingClientRect(); return r.top >= -2 && r.bottom <= window.innerHeight + 2; }"
    heading = page.locator("#mapclip-results-heading")
    assert heading.evaluate(on_screen), (width, heading.bounding_box())
    assert page.evaluate("() => document.activeElement.id") == "mapclip-results-heading"
    assert heading.inner_text().startswith("Maps 1\u201320 of 24")
    # from there the first result is a few Tab presses away (past the SQL, JSON and download links)
    first_card = page.locator(".mapclip-card").first
    for presses in range(1, 9):
        page.keyboard.press("Tab")
        if first_card.evaluate("(card) => card.contains(document.activeElement)"):
            break
    assert first_card.evaluate("(card) => card.contains(document.activeElement)") and presses <= 7, presses

    # the second page is the last: its four maps, and no "Next" to an empty page
    navigating(page, lambda: page.click("a.mapclip-next"))
    assert len(result_ids(page)) == 4 and page.locator("a.mapclip-next").count() == 0
    assert page.locator("#mapclip-results-heading").inner_text().startswith("Maps 21\u201324 of 24")

    # a file that is not a picture: the error is what the visitor sees, focused
    bad = folder.parent / f"not-a-map-{width}.jpg"
    bad.write_bytes(b"<!DOCTYPE html><html>hi</html>")
    navigating(page, lambda: page.set_input_files("input[name=image]", str(bad)))
    error = page.locator(".mapclip-error")
    assert "not a usable image" in error.inner_text()
    assert error.evaluate(on_screen) and page.evaluate("() => document.activeElement.classList.contains('mapclip-error')")

    # a real picture: it is shown back beside "Now using your uploaded image"
    page.goto(f"{url}/-/mapclip")
    navigating(page, lambda: page.set_input_files("input[name=image]", str(folder / "sheet_0003.jpg")))
    preview = page.locator("img.mapclip-upload-preview")
    assert preview.is_visible() and preview.evaluate("i => i.complete && i.naturalWidth > 0")
    assert page.locator("#mapclip-results-heading").evaluate(on_screen), page.evaluate(
        "() => [document.getElementById('mapclip-results-heading').getBoundingClientRect().top, window.innerHeight]")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"upload-shown-{width}.png"))
    page.close()
