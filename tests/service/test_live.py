"""The live page (agent/service/live.py) as an installer sees it: a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) on the page of a real agent process that plays the embedded demo clip, the shots
checked against the messages a real SUB socket receives; the same page from `bestshot subscribe --view`; 100 pages
and a page that never reads against the agent's frame rate and memory; the token; no camera password anywhere.

Real parts only: `python -m agent.cli run` and `subscribe` as child processes, real sockets on 127.0.0.1. Every wait
is a polled condition with a generous ceiling.
"""

from __future__ import annotations

import base64
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from test_agent_process import AgentRun, Consumer, free_port, until

from agent.pipeline.outputs.zeromq import Message
from agent.pipeline.sources.demo import demo_clip_path
from agent.service.config import ConfigError, parse_config
from agent.service.live import LiveView, read_token
from agent.service.metrics import serve

# The whole module runs alone after the parallel part (marker serial): the frame-rate check needs the machine to
# itself, and its memory bound needs the agent warmed by the browser tests before it, as in file order.
pytestmark = [pytest.mark.timeout(600), pytest.mark.serial]

SECRET = "s3cret-Passw0rd"  # in a camera URL: must never reach the page
TOKEN = "a-live-page-token-0123456789"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PAGES = 100


@dataclass
class Agent:
    run: AgentRun
    consumer: Consumer
    url: str
    publisher: str


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """The demo clip looping at its own pace (10 fps kept), an update shot every 2 s and a best shot as each face
    leaves; a second camera whose URL holds a password and where nothing listens (down, reconnecting)."""
    tmp = tmp_path_factory.mktemp("live")
    pub, http, nobody = free_port(), free_port(), free_port()
    cfg = {"defaults": {"source": {"loop": True, "realtime": True, "max_fps": 10},
                        "selection": {"update_every_s": 2.0}},
           "cameras": [{"id": "demo", "url": str(demo_clip_path())},
                       {"id": "gate", "url": f"rtsp://admin:{SECRET}@127.0.0.1:{nobody}/stream"}],
           "scoring": {"shots": 3},
           "publisher": {"endpoint": f"tcp://127.0.0.1:{pub}"},
           "metrics": {"listen": f"127.0.0.1:{http}"},
           "live": {"enabled": True, "history": 6, "max_pages": PAGES + 10}}
    consumer = Consumer(f"tcp://127.0.0.1:{pub}")  # before the agent starts: it gets every shot
    try:
        with AgentRun.with_config(tmp, cfg) as run:
            run.wait_log("http://127.0.0.1:", 300)  # models prepared (a fresh cache: minutes on a busy box), served
            yield Agent(run, consumer, f"http://127.0.0.1:{http}", f"tcp://127.0.0.1:{pub}")
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver: bash tests/setup_system.sh")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,950"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def first_state(url: str, headers: dict[str, str] | None = None) -> dict:
    """The "state" event that opens a page's event stream."""
    req = urllib.request.Request(url + "/live/events", headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        lines = iter(r.readline, b"")
        for line in lines:
            if line == b"event: state\n":
                return json.loads(next(lines).removeprefix(b"data: "))
    raise AssertionError("no state event")


TILES_JS = """return [...document.querySelectorAll('.tile')].map(t => ({
  camera: t.dataset.camera, track: t.dataset.track, frame: t.dataset.frame,
  classes: [...t.classList], seq: t.dataset.seq,
  fields: Object.fromEntries([...t.querySelectorAll('dd')].map(d => [d.className, d.textContent])),
  images: [...t.querySelectorAll('img')].map(i => [i.complete, i.naturalWidth, i.naturalHeight])}))"""


def tiles(driver: WebDriver) -> list[dict]:
    return driver.execute_script(TILES_JS)


def images_decoded(driver: WebDriver) -> list[dict] | None:
    """The tiles once every image of every tile has loaded with a size (None until then)."""
    now = tiles(driver)
    return now if now and all(c and w > 0 and h > 0 for t in now for c, w, h in t["images"]) else None


def fmt(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float | int) and not isinstance(v, bool) else "–"


def published_for(tile: dict, metas: list[dict]) -> dict:
    """The message a tile shows: its camera, track, frame, status and frames seen and scored (which grow from one
    update of a track to the next; each output stamps its own published_at)."""
    found = [m for m in metas if m["camera"] == tile["camera"] and str(m["track_id"]) == tile["track"]
             and str(m["frame_index"]) == tile["frame"] and m["status"] in tile["classes"]
             and tile["fields"]["frames"] == f"{m['frames_seen']} seen / {m['frames_scored']} scored"]
    assert len(found) == 1, f"tile {tile} matches {len(found)} published message(s)"
    return found[0]


def check_tile(tile: dict, m: dict) -> None:
    x, f = m["extra"], tile["fields"]
    recognisable = "–" if "recognisable" not in x else "yes" if x["recognisable"] else "no"
    assert f == {"track": f"{m['track_id']} ({m['status']})", "quality": fmt(m["quality"]),
                 "prefiqs": fmt(m["prefiqs"]), "ers": fmt(x.get("ers")), "recognisable": recognisable,
                 "frames": f"{m['frames_seen']} seen / {m['frames_scored']} scored", "time": f["time"]}, tile
    assert m["status"] in tile["classes"]


def text(driver: WebDriver, selector: str) -> str | None:
    """The text of the first element `selector` finds, read at once (the page rebuilds its camera sections on every
    event: a WebElement found earlier may be gone)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent",
                                 selector)


def table_rows(driver: WebDriver, cls: str) -> list[list[str]]:
    return driver.execute_script(f"""return [...document.querySelectorAll('#detail table.{cls} tr')].slice(1)
        .map(r => [...r.cells].map(c => c.textContent))""")


def test_browser_shows_the_published_shots_and_why(agent: Agent, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(agent.url + "/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)
    wait.until(lambda d: any("best" in t["classes"] for t in tiles(d)) and len(tiles(d)) >= 3)
    shown = wait.until(images_decoded)
    metas = agent.consumer.metas()
    for tile in shown:
        check_tile(tile, published_for(tile, metas))
    cams = "return [...document.querySelectorAll('section.camera')].map(c => c.dataset.camera)"
    assert browser.execute_script(cams) == ["demo", "gate"]
    wait.until(lambda d: (text(d, "[data-camera=demo] .badge"), text(d, "[data-camera=gate] .badge")) == ("up", "down"))
    wait.until(lambda d: re.fullmatch(r"\d+\.\d fps in", text(d, "[data-camera=demo] .fps")))

    # a best shot's details: its top-K frames and why each was kept, its diverse shots, its gated frames
    best = next(t for t in shown if "best" in t["classes"])
    browser.find_element(By.CSS_SELECTOR, f".tile[data-seq='{best['seq']}']").click()
    wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed())
    x = published_for(best, metas)["extra"]
    top = table_rows(browser, "top-k")
    assert [r[0] for r in top] == [str(k["frame_index"]) for k in x["top_k"]]
    assert top[0][3] == "best quality: the published shot" and all(r[3] for r in top)
    assert [r[0] for r in table_rows(browser, "diverse")] == [str(s["frame_index"]) for s in x["shots"]]
    gated = table_rows(browser, "gated")
    assert sorted(int(r[1]) for r in gated) == sorted(x["gated"].values())
    if not x["gated"]:
        assert text(browser, "#detail .gated-none") == "none"

    # no camera password: not in the page, its script, its events, /metrics nor /healthz
    assert SECRET not in browser.page_source
    for path in ("/", "/live.js", "/metrics", "/healthz"):
        assert SECRET.encode() not in get(agent.url + path)[1], path
    assert SECRET not in json.dumps(first_state(agent.url))

    shot = Path(os.environ.get("BESTSHOT_LIVE_SCREENSHOT", tmp_path / "live.png"))  # docs/live.png: README
    assert browser.save_screenshot(str(shot))
    assert cv2.imread(str(shot)) is not None


def test_subscribe_view_shows_a_remote_agents_shots(agent: Agent, browser: WebDriver, tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "subscribe.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "subscribe", agent.publisher, "--view",
                                 f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"http://127.0.0.1:{port}"
        until(lambda: proc.poll() is None and "live page of the received shots" in
              (tmp_path / "subscribe.log").read_text(), 60, "the view to listen")
        until(lambda: first_state(url)["shots"].get("demo"), 60, "a shot on the view")
        state = first_state(url)
        assert state["remote"] and "gate" not in state["status"]  # a remote camera is known by its shots only
        metas = agent.consumer.metas()
        for meta in state["shots"]["demo"]:
            sent = [m for m in metas if m["published_at"] == meta["published_at"]]  # what it received, as it was
            assert len(sent) == 1 and {**sent[0], "extra": {k: v for k, v in sent[0]["extra"].items()
                                                            if k != "template"}, "seq": meta["seq"]} == meta
        browser.get(url + "/")
        shown = WebDriverWait(browser, 60, poll_frequency=0.5).until(images_decoded)
        for tile in shown:
            check_tile(tile, published_for(tile, agent.consumer.metas()))
        assert text(browser, "[data-camera=demo] .badge") == "remote"
    finally:
        proc.terminate()
        proc.wait(30)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and all(f'{k}="{v}"' in (m[1] or "") for k, v in labels.items()):
            total += float(m[2])
    return total


def frames_kept(url: str) -> tuple[float, float]:
    """(monotonic time, frames of the demo camera that went on to detection: decoded less every drop)."""
    text = get(url + "/metrics")[1].decode()
    return time.monotonic(), (metric(text, "bestshot_frames_decoded_total", camera="demo")
                              - metric(text, "bestshot_frames_dropped_total", camera="demo"))


def frame_rate(url: str, seconds: float) -> float:
    (t0, n0) = frames_kept(url)
    time.sleep(seconds)
    (t1, n1) = frames_kept(url)
    return (n1 - n0) / (t1 - t0)


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def open_stream(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /live/events HTTP/1.1\r\nHost: x\r\n\r\n")
    return s


def test_hundred_pages_and_one_that_never_reads_keep_the_frame_rate(agent: Agent) -> None:
    """Frames kept per second by the agent (the demo clip paced at 10 kept frames/s) with no page open, then with
    100 pages reading their streams and one that never reads: no more than 5 % fewer, RSS growth bounded, and every
    page's connection released when they go."""
    port = int(agent.url.rpartition(":")[2])
    until(lambda: metric(get(agent.url + "/metrics")[1].decode(), "bestshot_live_pages") == 0, 60, "no page open")
    # run alone is the module's first test: its start (the first scoring batches growing ONNX Runtime's arenas,
    # the first shots) must not count as the pages' memory
    frame_rate(agent.url, 10)
    alone, rss0 = frame_rate(agent.url, 10), rss_mib(agent.run.proc.pid)
    assert alone > 5, f"the demo camera runs at {alone:.1f} frames/s (10 expected)"
    stalled = open_stream(port, rcvbuf=4096)
    pages = [open_stream(port) for _ in range(PAGES)]
    sel = selectors.DefaultSelector()
    for s in pages:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    received = [0]

    def read(until_t: float) -> None:
        while time.monotonic() < until_t:
            for key, _ in sel.select(0.2):
                try:
                    received[0] += len(key.fileobj.recv(65536))
                except BlockingIOError:
                    pass

    try:
        read(time.monotonic() + 3)
        assert metric(get(agent.url + "/metrics")[1].decode(), "bestshot_live_pages") == PAGES + 1
        t0, n0 = frames_kept(agent.url)
        read(t0 + 10)
        t1, n1 = frames_kept(agent.url)
        loaded, rss1 = (n1 - n0) / (t1 - t0), rss_mib(agent.run.proc.pid)
        assert received[0] > PAGES * 1000  # they do get their state and events
    finally:
        for s in [*pages, stalled]:
            s.close()
    print(f"frames/s: {alone:.2f} without pages, {loaded:.2f} with {PAGES} + 1 stalled; "
          f"RSS {rss0:.0f} -> {rss1:.0f} MiB")
    assert loaded >= 0.95 * alone, (alone, loaded)  # faster is no harm: on a starved box the pace varies by itself
    assert rss1 - rss0 < 64, (rss0, rss1)
    until(lambda: metric(get(agent.url + "/metrics")[1].decode(), "bestshot_live_pages") == 0, 60,
          "every page's connection released")


def message(camera: str, n: int, size: int = 2000) -> Message:
    jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), n % 255, np.uint8))[1].tobytes()
    meta = {"camera": camera, "track_id": n, "status": "best", "frame_index": n, "published_at": 1e9 + n,
            "quality": 0.5, "extra": {"template": [0.0] * 4, "pad": "x" * size}}
    return Message(f"bestshot.{camera}", meta, jpeg, jpeg, None)


def test_a_page_that_never_reads_is_cut_off_and_memory_stays_bounded() -> None:
    """In-process: adding shots never waits on a page that does not read; it is cut off (or times out) and
    released, and only `history` shots per camera are kept."""
    view = LiveView(history=3, queue_size=8, status_interval_s=1.0).start()
    server = serve("127.0.0.1:0", None, None, request_timeout_s=2.0, pages=view)
    stalled = open_stream(server.server_address[1], rcvbuf=4096)
    try:
        until(lambda: len(view.pages) == 1, 30, "the page to connect")
        t0 = time.monotonic()
        for n in range(3000):  # ~6 MB of events: more than the sockets' buffers hold
            view.add(message("c", n))
        assert time.monotonic() - t0 < 60  # no wait on the page: far below its timeouts times the shots
        until(lambda: not view.pages, 60, "the page that never reads to be let go")
        assert len(view.shots) == 3 and [s.meta["track_id"] for s in view.cameras["c"]] == [2997, 2998, 2999]
        assert all("template" not in s.meta["extra"] for s in view.shots.values())
    finally:
        stalled.close()
        view.close()
        server.shutdown()
        server.server_close()


def test_token_required_and_checked() -> None:
    view = LiveView(token=TOKEN).start()
    view.add(message("c", 1))
    server = serve("127.0.0.1:0", None, None, pages=view)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    wrong = "Basic " + base64.b64encode(f"anyone:{TOKEN}x".encode()).decode()
    try:
        for path in ("/", "/live.js", "/live/events", "/live/shot/1/face.jpg"):
            assert get(url + path)[0] == 401, path
            assert get(url + path, {"Authorization": wrong})[0] == 401, path
            assert get(url + path, {"Authorization": f"Bearer {TOKEN[:-1]}"})[0] == 401, path
        assert get(url + "/", {"Authorization": basic})[0] == 200
        code, face = get(url + "/live/shot/1/face.jpg", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and cv2.imdecode(np.frombuffer(face, np.uint8), cv2.IMREAD_COLOR).shape == (8, 8, 3)
        assert first_state(url, {"Authorization": basic})["shots"]["c"][0]["track_id"] == 1
    finally:
        view.close()
        server.shutdown()
        server.server_close()


def test_off_loopback_needs_a_token_and_plaintext_consent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"cameras": [{"id": "a", "url": "clip.mp4"}], "metrics": {"listen": "0.0.0.0:9108"}}
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "live": {"enabled": True}})
    assert any(err.startswith("live.token:") for err in e.value.errors)
    assert any(err.startswith("live.allow_plaintext:") for err in e.value.errors)
    cfg = parse_config({**base, "live": {"enabled": True, "token": {"credential": "live"}, "allow_plaintext": True}})
    assert any("live page on 0.0.0.0:9108" in w for w in cfg.warnings())
    assert parse_config({**base, "metrics": {"listen": "127.0.0.1:9108"}, "live": {"enabled": True}}).live.enabled
    assert not parse_config(base).live.enabled  # off unless configured

    (tmp_path / "live").write_text(TOKEN + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_token(credential="live") == TOKEN
    monkeypatch.setenv("SHORT_TOKEN", "short")
    with pytest.raises(ValueError, match="shorter than 16"):
        read_token(env="SHORT_TOKEN")
