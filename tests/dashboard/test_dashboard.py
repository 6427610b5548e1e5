"""The dashboard in a real browser (issue 12): Debian's Chromium, driven by Playwright, against a
real `trainplan serve` on loopback with API keys on, and a real `trainplan worker` started when a
test wants its plan to run. Every test fails on a request to any other host and on a script
error. Screenshots of each page land in build/screenshots/ (the run prints where).

Nothing is downloaded: Playwright drives the browser binary it is pointed at
(`TRAINPLAN_CHROMIUM`, else `chromium` on PATH; `.ci/run` installs Debian's package).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.schemas.examples import SMALL_GRAYSCALE_CNN, TINY_LLAMA
from service.schemas.spec import SearchSpec

playwright_api = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402

from tests.helpers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = os.environ.get("TRAINPLAN_CHROMIUM") or shutil.which("chromium") or ""
GiB = 2**30

if not CHROMIUM:
    if os.environ.get("CI"):
        raise RuntimeError("no Chromium for the browser tests: .ci/run installs Debian's package")
    pytest.skip("no Chromium (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow


class Server:
    """`trainplan serve --no-worker` on a fresh SQLite store; `run_worker` runs plans."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(
            os.environ,
            TRAINPLAN_DATABASE_URL=f"sqlite:///{tmp}/dashboard.db",
            TRAINPLAN_AUTH_MODE="keys",
            TRAINPLAN_POLL_SECONDS="0.2",
            TRAINPLAN_FEED_POLL_SECONDS="0.1",
            TRAINPLAN_WEBHOOK_SECRET="dashboard-test-webhook-secret",
            TRAINPLAN_WEBHOOK_ALLOW_PRIVATE="true",
        )
        self.log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--no-worker", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"trainplan serve did not start: see {tmp}/server.log")

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def key(self, tenant: str = "acme") -> str:
        return self.cli("keys", "create", "--tenant", tenant, "--scope", "submit,read")

    def run_worker(self, plans: int = 1, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--max-plans", str(plans)],
            cwd=ROOT,
            env=self.env | env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("dashboard"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


# Layout shifts as Chromium reports them (those without recent input), summed per page.
LAYOUT_SHIFTS = """
window.__shifts = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries())
    if (!e.hadRecentInput)
      window.__shifts.push([
        e.startTime, e.value, e.sources.map((s) => s.node && (s.node.id || s.node.nodeName)),
      ]);
}).observe({ type: "layout-shift", buffered: true });
"""


@pytest.fixture
def context(browser: Browser, server: Server) -> Iterator[BrowserContext]:
    """A fresh browser profile; fails the test on any request off this server or a script error."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server.base)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base)
    ctx.add_init_script(LAYOUT_SHIFTS)
    elsewhere: list[str] = []
    errors: list[str] = []

    def guard(route: Any) -> None:
        url = route.request.url
        if url.startswith((server.base, "blob:", "data:")):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    ctx.route("**/*", guard)
    ctx.on("weberror", lambda e: errors.append(str(e.error)))
    ctx.on("console", lambda m: errors.append(m.text) if _a_script_error(m) else None)
    yield ctx
    ctx.close()
    assert elsewhere == [], f"requests off the server: {elsewhere}"
    assert errors == [], f"script errors: {errors}"


def _a_script_error(message: Any) -> bool:
    """Chromium logs an answer of 4xx as "Failed to load resource" (expected: a bad key, a bad
    spec). ReDoc's sidebar always asks for its maker's logo from cdn.redoc.ly; the docs pages'
    CSP blocks it before any request leaves (the route guard would see one), and Chromium logs
    that too. Anything else on the console's error level is a script's."""
    text = message.text
    return (
        message.type == "error"
        and not text.startswith("Failed to load resource: the server")
        and not ("cdn.redoc.ly/redoc/logo-mini.svg" in text and "has been blocked" in text)
    )


NOTICES = """(() => {
  window.__notices = [];
  const notice = document.querySelector('#notice');
  new MutationObserver(() => window.__notices.push(notice.textContent))
    .observe(notice, { childList: true, characterData: true, subtree: true });
})()"""


def _shot(page: Page, name: str, full_page: bool = False) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def _sign_in(page: Page, server: Server, key: str | None = None, then: str = "/") -> str:
    key = key or server.key()
    page.goto(then)
    expect(page).to_have_url(f"{server.base}/sign-in?next={then.replace('/', '%2F')}")
    page.fill("#key", key)
    page.click("form[action='/sign-in'] button")
    expect(page).to_have_url(f"{server.base}{then}")
    # the URL changes when the navigation commits; the page's script runs later (CI once typed
    # into the editor before the script loaded its default example over the text)
    page.wait_for_load_state("load")
    return key


def _csrf(page: Page) -> str:
    return next(c["value"] for c in page.context.cookies() if c["name"] == "trainplan_csrf")


def _submit_api(page: Page, spec: dict[str, Any]) -> str:
    """Submit over the API as the page would: the session cookie and the CSRF header."""
    answer = page.request.post("/v1/plans", data=spec, headers={"X-CSRF-Token": _csrf(page)})
    assert answer.status in (200, 202), answer.text()
    return str(answer.json()["id"])


def _spec(epochs: int = 10) -> dict[str, Any]:
    spec = json.loads(json.dumps(SMALL_GRAYSCALE_CNN))
    spec["training"]["epochs"] = epochs
    return spec


def test_sign_in_submit_from_the_form_and_watch_the_plan_live(
    context: BrowserContext, server: Server
) -> None:
    page = context.new_page()
    page.goto("/plans/new")
    expect(page).to_have_url(f"{server.base}/sign-in?next=%2Fplans%2Fnew")  # signed out
    _shot(page, "sign-in")
    page.fill("#key", "tp_wrong")
    page.click("form[action='/sign-in'] button")
    expect(page.locator("#sign-in-error")).to_contain_text("not valid")
    key = _sign_in(page, server, then="/plans/new")
    session = next(c for c in context.cookies() if c["name"] == "trainplan_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert key not in page.content()
    assert page.evaluate("document.cookie").find("trainplan_session") == -1  # script can't read it

    page.click("button[data-example='grayscale_cnn']")
    assert json.loads(page.input_value("#spec"))["model"]["source"] == "layers"
    _shot(page, "new-plan")
    page.click("#submit")
    page.wait_for_url(re.compile(r".*/plans/[0-9a-f-]{36}$"))
    plan_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#status")).to_have_text("queued")
    expect(page.locator("#cancel")).to_be_visible()

    page.evaluate(NOTICES)  # every text the live notice shows, from here to the end
    worker = server.run_worker(plans=1)  # the plan runs only now: its trials must stream in
    try:
        expect(page.locator("#status")).to_have_text("succeeded", timeout=180_000)
    finally:
        worker.wait(timeout=120)
    assert page.evaluate("window.trainplanTrialEvents") > 0  # trials came over SSE, one by one
    expect(page.locator("#cancel")).to_be_hidden()
    answer = page.request.get(f"/v1/plans/{plan_id}")
    assert answer.status == 200, answer.text()
    result = answer.json()["result"]
    trials, memory = result["trials"], result["memory"]

    # the chart: one point per trial, fits and OOMs apart, the capacity and headroom lines,
    # the answer and answer + 1 marked
    sets = {
        d["label"]: d["data"]
        for d in page.evaluate(
            "trainplanCharts.memory.data.datasets.map(d => ({label: d.label, data: d.data}))"
        )
    }
    assert len(sets["fits"]) == sum(t["fits"] for t in trials)
    assert len(sets["out of memory"]) == sum(not t["fits"] for t in trials)
    assert len(sets["fits"]) + len(sets["out of memory"]) == len(trials)
    assert [p["y"] for p in sets["capacity"]] == [memory["capacity"] / GiB] * 2
    headroom = _spec().get("search", {}).get("headroom", SearchSpec().headroom)
    assert sets["headroom limit"][0]["y"] == pytest.approx(
        memory["capacity"] * (1 - headroom) / GiB
    )
    best = result["max_micro_batch_size"]
    assert [p["x"] for p in sets["answer (max micro-batch)"]] == [best]
    assert [p["x"] for p in sets["answer + 1"]] == [best + 1]
    assert page.locator("#trials tbody tr").count() == len(trials)
    # the live count never ran past the plan's trials (what-if probes are counted apart), and
    # the end agrees with it
    counted = [
        int(m)
        for m in re.findall(r"Running: (\d+) trial", " ".join(page.evaluate("window.__notices")))
    ]
    assert counted and max(counted) <= len(trials), page.evaluate("window.__notices")
    assert page.locator("#trial-count").inner_text() == f"{len(trials)} trials"
    # answer and answer + 1 apart on the linear close-up (on the log axis they share a spot)
    apart = page.evaluate(
        f"trainplanCharts.answer.scales.x.getPixelForValue({best + 1})"
        f" - trainplanCharts.answer.scales.x.getPixelForValue({best})"
    )
    assert apart > 20
    close_up = page.evaluate("trainplanCharts.answer.data.datasets.map(d => d.data.map(p => p.x))")
    assert close_up[:2] == [[best], [best + 1]]
    expect(page.locator("#answer-note")).to_have_text(f"{best:,} fits, {best + 1:,} does not")
    speed = page.locator("#s-speed").inner_text()
    band = (result.get("throughput") or {}).get("samples_per_second_band")
    assert speed.endswith("samples/s") or ("% band " in speed) == bool(band), speed
    risk = result.get("risk")
    assert page.locator("#c-risk").is_visible() == bool(risk)
    if risk:  # the chance at the recommended micro-batch, then at the max
        shown = page.locator("#s-risk").inner_text()
        chance = risk["oom_probability"]
        assert shown.startswith("<0.1%" if chance < 0.001 else f"{100 * chance:.1f}%"), shown
        assert "at the max" in shown
        # the chance by probed micro-batch, charted: the API's points, the recommended one marked
        drawn = page.evaluate(
            "trainplanCharts.risk.data.datasets.map(d => d.data.map(p => [p.x, p.p]))"
        )
        curve = [[q["micro_batch"], q["oom_probability"]] for q in risk["by_micro_batch"]]
        assert drawn[0] == curve and drawn[1] == [
            q for q in curve if q[0] == result["micro_batch_size"]
        ]
        assert (
            page.locator("#risk-note")
            .inner_text()
            .endswith(f"(headroom {round(100 * risk['headroom'], 1):g}%)")
        )
    # no empty band under the title: the summary follows the heading
    gap = page.evaluate(
        "document.querySelector('#summary').getBoundingClientRect().top"
        " - document.querySelector('.heading').getBoundingClientRect().bottom"
    )
    assert gap < 24, gap

    # the breakdown adds up to the peak, and the chart stacks the same parts
    parts = [
        int(v)
        for v in page.locator("#breakdown tr.part span.bytes").evaluate_all(
            "spans => spans.map(s => s.dataset.bytes)"
        )
    ]
    peak_cell = page.locator("#breakdown tr.total span.bytes")
    assert sum(parts) == int(peak_cell.get_attribute("data-bytes") or 0) == memory["peak"]
    assert peak_cell.get_attribute("title") == f"{memory['peak']:,} bytes"  # exact on hover
    stacked = page.evaluate(
        "trainplanCharts.breakdown.data.datasets.filter(d => d.category !== 'allocator_cached')"
        ".map(d => d.bytes)"
    )
    assert sum(stacked) == memory["peak"]
    assert page.locator("#s-max").inner_text() == f"{best:,}"

    # the learning-rate schedule, drawn from its sampled points
    lr_points = page.evaluate("trainplanCharts.schedule.data.datasets[0].data.map(p => [p.x, p.y])")
    assert lr_points == [[p["step"], p["learning_rate"]] for p in result["schedule"]["points"]]

    # what-ifs against the plan, configs to copy and download
    bars = page.evaluate("trainplanCharts.whatif.data.datasets[0].data")
    assert bars == [best] + [w["max_micro_batch_size"] for w in result["what_if"]]
    first = page.locator("details.config").first
    name = first.get_attribute("data-config")
    assert name == "pytorch" and first.get_attribute("open") is not None  # the loop, open
    first.locator("button[data-copy]").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    config = result["configs"][name]
    assert copied == (config if isinstance(config, str) else json.dumps(config, indent=2))
    with page.expect_download() as download:
        first.locator("button[data-download]").click()
    assert download.value.suggested_filename.endswith((".py", ".json"))

    # streaming moved nothing on the page: layout shifts before the plan's end event
    shifts = page.evaluate(
        "window.__shifts.filter(([t]) => t < window.trainplanEndAt).reduce((a, [, v]) => a + v, 0)"
    )
    assert shifts < 0.01, page.evaluate("window.__shifts")
    _shot(page, "plan", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    _shot(page, "plan-phone", full_page=True)
    wide = page.evaluate(
        "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right"
        " > window.innerWidth + 1).slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)"
    )
    # nothing runs off a phone's screen (code blocks and wide tables scroll in their own boxes)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), wide


def test_a_bad_spec_shows_the_apis_error_at_the_field(
    context: BrowserContext, server: Server
) -> None:
    page = context.new_page()
    _sign_in(page, server, then="/plans/new")
    spec = _spec()
    spec["data"]["height"] = 0
    text = json.dumps(spec, indent=2)
    page.fill("#spec", text)
    page.click("#submit")
    error = page.locator("#spec-errors li[data-field='data.height']")
    expect(error).to_contain_text("greater than or equal to 1")
    expect(page).to_have_url(f"{server.base}/plans/new")  # nothing lost: still here, as typed
    assert page.input_value("#spec") == text
    selected = page.evaluate(
        "(() => { const e = document.querySelector('#spec');"
        " return e.value.slice(e.selectionStart, e.selectionEnd); })()"
    )
    assert selected == '"height"'  # the editor selects the field the API named
    line = text[: text.index('"height"')].count("\n") + 1
    assert error.get_attribute("data-line") == str(line)
    assert page.locator("#gutter .bad").all_inner_texts() == [str(line)]
    _shot(page, "new-plan-error")
    page.fill("#spec", '{"model": ')  # not JSON at all: said at once, nothing sent
    page.click("#submit")
    expect(page.locator("#spec-errors")).to_contain_text("Not valid JSON")


def test_the_plans_list_filters_pages_and_updates_live(
    context: BrowserContext, server: Server
) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("list-tenant"))
    ids = [_submit_api(page, _spec(epochs=20 + n)) for n in range(3)]
    page.goto("/?limit=2")
    rows = page.locator("#plans tbody tr[data-id]")
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.id)") == ids[::-1][:2]  # newest first
    page.click("#older")
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-id") == ids[0]
    page.click("#newest")
    expect(rows).to_have_count(2)
    page.select_option("#status-filter", "queued")
    page.click("#filters button[type=submit]")
    expect(page).to_have_url(f"{server.base}/?status=queued")
    expect(rows).to_have_count(3)
    page.goto("/")
    expect(rows).to_have_count(3)
    worker = server.run_worker(plans=1)  # the oldest runs; its row changes without a reload
    try:
        expect(page.locator(f"tr[data-id='{ids[0]}'] .badge")).to_have_text(
            "succeeded", timeout=180_000
        )
    finally:
        worker.wait(timeout=120)
    _shot(page, "plans")
    csrf = {"X-CSRF-Token": _csrf(page)}
    for plan_id in ids[1:]:  # leave no queued plan for another test's worker to take
        assert page.request.post(f"/v1/plans/{plan_id}/cancel", headers=csrf).ok


def test_a_queued_plan_is_cancelled_from_its_page(context: BrowserContext, server: Server) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("cancel-tenant"))
    plan_id = _submit_api(page, _spec(epochs=99))
    page.goto(f"/plans/{plan_id}")
    expect(page.locator("#status")).to_have_text("queued")
    page.keyboard.press("Tab")  # the skip link first: the page is reachable by keyboard
    assert page.evaluate("document.activeElement.className") == "skip"
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_hidden()


def test_a_plan_shows_its_completion_webhooks(context: BrowserContext, server: Server) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("hook-tenant"))
    hook = "http://127.0.0.1:9/trainplan-hook"
    plan_id = _submit_api(page, _spec(epochs=98) | {"callback_url": hook})
    # cancelled at once: the shared server's later tests run one plan each on a worker, which
    # must not pick this one (its delivery is then due; the workers those tests start send it)
    cancelled = page.request.post(
        f"/v1/plans/{plan_id}/cancel", headers={"X-CSRF-Token": _csrf(page)}
    )
    assert cancelled.status in (200, 202), cancelled.text()
    page.goto(f"/plans/{plan_id}")
    row = page.locator("#deliveries tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator("td").first).to_have_text(hook)
    expect(row.locator(".badge")).to_have_text("waiting")  # no worker is running yet
    _shot(page, "plan-webhooks")


def test_a_failed_plan_shows_its_problem(context: BrowserContext, server: Server) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("failing-tenant"))
    plan_id = _submit_api(page, _spec(epochs=7))
    page.goto(f"/plans/{plan_id}")
    expect(page.locator("#status")).to_have_text("queued")
    server.run_worker(plans=1, TRAINPLAN_PLAN_TIMEOUT_SECONDS="0.05").wait(timeout=120)
    expect(page.locator("#status")).to_have_text("failed", timeout=60_000)
    problem = page.request.get(f"/v1/plans/{plan_id}").json()["error"]
    expect(page.locator("#problem")).to_be_visible()
    expect(page.locator("#problem")).to_contain_text(problem["title"])
    expect(page.locator("#cancel")).to_be_hidden()
    # no result: no numbers made up, and no skeleton of dashes and empty axes either
    expect(page.locator("#result-body")).to_be_hidden()
    expect(page.locator("#memory-chart")).to_be_hidden()
    expect(page.locator("#spec-section")).to_be_visible()
    _shot(page, "plan-failed")


def test_a_plan_that_is_not_there_shows_no_skeleton(
    context: BrowserContext, server: Server
) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("missing-tenant"))
    page.goto("/plans/00000000-0000-4000-8000-000000000000")
    expect(page.locator("#status")).to_have_text("not found")
    expect(page.locator("#notice")).to_contain_text("No such plan")
    expect(page.locator("#result-body")).to_be_hidden()
    expect(page.locator("#spec-section")).to_be_hidden()


def test_a_chart_of_batches_one_to_three_labels_each(
    context: BrowserContext, server: Server
) -> None:
    """The log axis labelled only "1" when every trial was at 1, 2 or 3."""
    page = context.new_page()
    _sign_in(page, server, key=server.key("tiny-tenant"))
    spec = _spec(epochs=4)
    spec["search"] = {"max_batch_size": 3, "what_if": False}
    plan_id = _submit_api(page, spec)
    server.run_worker(plans=1).wait(timeout=180)
    page.goto(f"/plans/{plan_id}")
    expect(page.locator("#status")).to_have_text("succeeded")
    labels = page.evaluate(
        "trainplanCharts.memory.scales.x.ticks.map(t => t.label).filter(l => l !== '')"
    )
    assert {"1", "2", "3"} <= set(labels), labels
    expect(page.locator("#answer-note")).to_have_text("3 fits (the search bound)")


def test_a_plan_for_the_fewest_gpus_shows_each_strategy(
    context: BrowserContext, server: Server
) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("scale-tenant"))
    spec = _spec(epochs=3)
    spec["training"]["parallelism"] = {"world_size": "auto"}
    spec["search"] = {"what_if": False}
    plan_id = _submit_api(page, spec)
    server.run_worker(plans=1).wait(timeout=180)
    page.goto(f"/plans/{plan_id}")
    expect(page.locator("#status")).to_have_text("succeeded")
    scale_out = page.request.get(f"/v1/plans/{plan_id}").json()["result"]["scale_out"]
    assert scale_out, "world_size 'auto' plans the fewest GPUs per strategy"
    rows = page.locator("#scale-out tbody tr")
    expect(rows).to_have_count(len(scale_out))
    for row, strategy in zip(rows.all(), scale_out, strict=True):
        assert row.locator("th").inner_text() == strategy["strategy"]
        assert row.locator("span.bytes").count() == len(strategy["checked"])
    expect(page.locator("#whatif li")).to_contain_text("No what-if was asked for")
    _shot(page, "plan-scale-out", full_page=True)


def test_an_auto_layout_plan_shows_each_layout_and_its_step(
    context: BrowserContext, server: Server
) -> None:
    page = context.new_page()
    _sign_in(page, server, key=server.key("layout-tenant"))
    config = TINY_LLAMA | {"vocab_size": 512, "num_hidden_layers": 2}
    spec = {
        "model": {"source": "transformers", "architecture": "LlamaForCausalLM", "config": config},
        "data": {"kind": "tokens", "seq_len": 128, "num_samples": 1000},
        "training": {
            "precision": "bf16-mixed",
            "global_batch_size": 64,
            "world_size": 2,
            "parallelism": {"layout": "auto"},
        },
        "device": {"kind": "simulated", "gpu": "H100-80GB", "memory_gib": 2},
        "search": {"what_if": False},
    }
    plan_id = _submit_api(page, spec)
    server.run_worker(plans=1).wait(timeout=300)
    page.goto(f"/plans/{plan_id}")
    expect(page.locator("#status")).to_have_text("succeeded")
    layouts = page.request.get(f"/v1/plans/{plan_id}").json()["result"]["layouts"]
    rows = page.locator("#layouts tbody tr")
    expect(rows).to_have_count(len(layouts["checked"]))
    first = layouts["checked"][0]  # ranked: the chosen one first
    expect(rows.first.locator("th")).to_have_text(
        f"tp{first['tensor_parallel']} · cp{first['context_parallel']} · "
        f"dp{first['data_parallel']} ✓"
    )
    expect(page.locator("#layouts tbody tr[data-chosen]")).to_have_count(1)
    expect(page.locator("#layouts-skipped li")).to_have_count(len(layouts["skipped"]))
    # the chart's stacked parts add up to each layout's step time
    feasible = [c for c in layouts["checked"] if c["feasible"]]
    totals = page.evaluate(
        "trainplanCharts.layouts.data.labels.map((_, i) => "
        "trainplanCharts.layouts.data.datasets.reduce((s, d) => s + d.data[i], 0))"
    )
    assert totals == pytest.approx([c["step_time_s"] for c in feasible])
    tp_part = page.evaluate("trainplanCharts.layouts.data.datasets[1].data")
    assert tp_part == pytest.approx([c["tensor_parallel_s"] for c in feasible])
    _shot(page, "plan-layouts", full_page=True)


def test_the_gpu_catalogue_sorts_from_the_keyboard(context: BrowserContext, server: Server) -> None:
    page = context.new_page()
    _sign_in(page, server, then="/gpus")
    memory = page.locator("th[data-key='memory_bytes']")
    expect(page.locator("#gpus tbody tr")).not_to_have_count(0)
    memory.locator("button").focus()
    page.keyboard.press("Enter")
    expect(memory).to_have_attribute("aria-sort", "descending")
    gpus = page.request.get("/v1/gpus").json()["items"]
    largest = max(gpus, key=lambda g: g["memory_bytes"])["name"]
    assert page.locator("#gpus tbody tr th").first.inner_text() == largest
    page.keyboard.press("Enter")
    expect(memory).to_have_attribute("aria-sort", "ascending")
    _shot(page, "gpus")


def test_the_api_docs_render_without_the_internet(context: BrowserContext, server: Server) -> None:
    page = context.new_page()
    page.goto("/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
    assert page.locator(".opblock").count() >= 8
    _shot(page, "docs")
    page.goto("/redoc")
    expect(page.locator("h2", has_text="Submit a plan")).to_be_visible(timeout=30_000)
    _shot(page, "redoc")
