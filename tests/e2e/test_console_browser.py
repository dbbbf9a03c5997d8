"""The console in a real browser: Debian's chromium, headless, driven by selenium.

One CA (with ``--console``), two agents and their entries are shared by the module; the
entries' SVIDs live 4 s, so the page has rotations to show within a couple of seconds.
Selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium and never fetches
a browser or a driver of its own (no download is possible here, nor wanted in CI).
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.conftest import make_ca, start_agent

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BAD = "rgb(198, 40, 40)"  # --bad in the page's style
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed"
        " (apt-get install chromium chromium-driver; .ci/run does)",
        allow_module_level=True,
    )

os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must fetch nothing
from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402


def query(browser, selector: str, script: str = "return [e.getAttribute('class'), e.textContent]"):
    """Read from every element matching ``selector`` in one script: the page redraws each
    second, so an element found in one call may be gone by the next."""
    return browser.execute_script(
        f"return Array.from(document.querySelectorAll(arguments[0])).map(e => {{{script}}});",
        selector,
    )


def wait_until(check, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    ca = make_ca(base, "--console", "127.0.0.1:0")
    agents, tokens = [], []
    try:
        for name in ("node-1", "node-2"):
            agent = start_agent(ca, base, name)
            agents.append(agent)
            args = agent.daemon.args
            tokens.append(args[args.index("--join-token") + 1])
            ca.cli(
                "entry",
                "create",
                "--spiffe-id",
                f"spiffe://example.org/svc/{name}",
                "--parent-id",
                agent.spiffe_id,
                "--selector",
                f"unix:uid:{os.geteuid()}",
                "--ttl",
                "4s",
            )
        yield ca, agents, tokens, base
    finally:
        for agent in agents:
            agent.daemon.stop()
            shutil.rmtree(Path(agent.socket).parent, ignore_errors=True)
        ca.daemon.stop()


@pytest.fixture(scope="module")
def browser(fleet):
    ca = fleet[0]
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1200",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(10)
    try:
        driver.get(ca.daemon.events("ca.started")[-1]["console"])
        wait_until(lambda: query(driver, "#agents tr[data-agent]"), what="the first snapshot")
        yield driver
    finally:
        driver.quit()


def test_the_page_draws_agents_entries_timeline_and_key_schedule(browser):
    wait_until(lambda: len(query(browser, "#agents tr[data-agent]")) == 2, what="both agents")
    assert query(browser, "#live", "return e.textContent") == ["live"]
    assert query(browser, "#timeline circle.ev-rotation")
    states = query(browser, "#keys rect", "return e.getAttribute('data-state')")
    assert "active" in states
    selectors = query(browser, "#entries .sel", "return e.textContent")
    assert selectors == [f"unix:uid:{os.geteuid()}"] * 2
    assert query(browser, "#chain-state", "return e.textContent") == ["chain unbroken"]


def test_a_rotation_appears_without_a_reload(browser):
    browser.execute_script("window.__sameDocument = 'yes';")

    def serials() -> set[str]:
        circles = '#timeline circle[data-event="svid.issued"]'
        return set(query(browser, circles, "return e.getAttribute('data-serial')"))

    seen = serials()
    assert seen
    wait_until(lambda: serials() - seen, timeout=15, what="a new SVID on the timeline")
    assert browser.execute_script("return window.__sameDocument;") == "yes"


def test_an_evicted_agent_turns_red(browser, fleet):
    ca, agents, _, _ = fleet
    evicted = agents[1].spiffe_id
    ca.cli("agent", "evict", evicted)
    row = f'#agents tr[data-agent="{evicted}"]'
    status = (
        "const s = e.querySelector('td.status');"
        " return [e.getAttribute('class'), s.textContent, getComputedStyle(s).color]"
    )
    wait_until(
        lambda: any("sev-bad" in cls for cls, *_ in query(browser, row, status)),
        what="the evicted agent's row to turn red",
    )
    [(cls, text, color)] = query(browser, row, status)
    assert text == "evicted" and color == BAD
    healthy = f'#agents tr[data-agent="{agents[0].spiffe_id}"]'
    [(cls, text, color)] = query(browser, healthy, status)
    assert "sev-ok" in cls and color != BAD
    assert query(browser, "#timeline circle.ev-failure")


def test_the_page_holds_no_secret(browser, fleet):
    _, agents, tokens, base = fleet
    dom = browser.execute_script("return document.documentElement.outerHTML;")
    for text in (browser.page_source, dom):
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
        for token in tokens:
            assert token not in text and token.split(".", 1)[1] not in text
        for agent in agents:
            for key_file in agent.data_dir.glob("**/*key*.pem"):
                body = "".join(key_file.read_text().splitlines()[1:-1])
                assert body[:32] not in text
        for key_file in (base / "ca" / "keys").glob("*.pem"):
            body = "".join(key_file.read_text().splitlines()[1:-1])
            assert body[:32] not in text


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB or RGBA PNG with the stdlib: width, height, RGB pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = 0
    channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        filt, cur = line[0], bytearray(line[1:])
        for i in range(stride):
            a = cur[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if filt == 1:
                cur[i] = (cur[i] + a) & 0xFF
            elif filt == 2:
                cur[i] = (cur[i] + b) & 0xFF
            elif filt == 3:
                cur[i] = (cur[i] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[i] = (cur[i] + pred) & 0xFF
        pixels.extend((cur[x], cur[x + 1], cur[x + 2]) for x in range(0, stride, channels))
        prev = cur
    return width, height, pixels


def test_the_page_does_not_render_blank(browser):
    if os.environ.get("TALLY_CONSOLE_SCREENSHOT"):  # to look at it: a full-size copy
        Path(os.environ["TALLY_CONSOLE_SCREENSHOT"]).write_bytes(browser.get_screenshot_as_png())
    # Half scale: a blank page is as blank, and the stdlib decoder has a quarter of the work.
    clip = {"x": 0, "y": 0, "width": 1400, "height": 1200, "scale": 0.5}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip})
    png = base64.b64decode(shot["data"])
    width, height, pixels = png_pixels(png)
    assert width >= 600 and height >= 500
    background, _ = Counter(pixels).most_common(1)[0]
    drawn = sum(1 for p in pixels if p != background)
    assert drawn / len(pixels) > 0.2, f"only {drawn} of {len(pixels)} pixels differ"
    # The status colours are on screen: green for the healthy, red for the evicted.
    near = lambda p, q: all(abs(x - y) < 30 for x, y in zip(p, q, strict=True))  # noqa: E731
    assert any(near(p, (46, 125, 50)) for p in pixels), "no green on the page"
    assert any(near(p, (198, 40, 40)) for p in pixels), "no red on the page"
