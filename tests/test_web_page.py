"""The demo page in a real browser (Debian's Chromium driven by Playwright) against a real
server running the embedded model.

The runner can hold each job after each preview until the test lets it go on, so what the
browser shows between previews is observed without any timing assumption.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.engine import Emit, StopRequested, ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import Event, Job, ModelProfile, Preview, Result
from pipeline.loading import ModelSpec
from pipeline.loras import LoraSpec
from pipeline.runner import FluxRunner
from stream.app import create_app
from stream.errors import error_body
from tests.conftest import make_settings
from tests.fakes import FakeEngine
from tests.servers import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
if not CHROMIUM.exists():
    pytest.skip(
        f"Chromium is not installed at {CHROMIUM}; `make test` installs it with apt-get "
        "where apt is usable (as root)",
        allow_module_level=True,
    )

from playwright.sync_api import (  # noqa: E402
    Browser,
    Locator,
    Page,
    Route,
    expect,
    sync_playwright,
)

PARTIAL = '#preview[data-kind="partial"][data-index="{}"]'
# How many example prompts the page shows under the prompt box (EXAMPLES_SHOWN in app.js).
EXAMPLES_SHOWN = 4
# Waits end as soon as the page shows the value; the limit only bounds a failing test on a
# busy machine.
expect.set_options(timeout=30_000)


class HeldRunner:
    """The real runner; while `holding`, it waits after each preview for one `go()`."""

    def __init__(self, runner: FluxRunner) -> None:
        self._runner = runner
        self._permits = threading.Semaphore(0)
        self.holding = False

    @property
    def profile(self) -> ModelProfile:
        return self._runner.profile

    def hold(self) -> None:
        """Hold from the next preview on, with no permits left over from earlier tests."""
        self._permits = threading.Semaphore(0)
        self.holding = True

    def go(self) -> None:
        self._permits.release()

    def free(self) -> None:
        """Stop holding, and let a job that waits now go on."""
        self.holding = False
        self._permits.release()

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        def emit_then_wait(event: Event) -> None:
            emit(event)
            if isinstance(event, Preview) and self.holding:
                self._permits.acquire(timeout=60)

        return self._runner.run(job, emit_then_wait, stop_requested)


@pytest.fixture(scope="module")
def held_runner(model_cache: Path) -> HeldRunner:
    return HeldRunner(create_flux_runner(ModelSpec(cache_dir=model_cache)))


@pytest.fixture(scope="module")
def page_server(held_runner: HeldRunner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("web"), max_pixels=256 * 256)
    engine = ThreadedEngine(held_runner, max_queued=4)
    with live_server(create_app(settings, engine)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, page_server: str, held_runner: HeldRunner) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(page_server)
    held_runner.hold()
    yield page
    held_runner.free()
    context.close()


def start(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#resolution", "0.5K")
    page.click("#generate")


def test_image_sharpens_through_previews_then_lands_in_the_gallery(
    page: Page, held_runner: HeldRunner, tmp_path: Path
) -> None:
    start(page, "a lighthouse at dusk")
    previews = []
    for index in range(3):
        page.wait_for_selector(PARTIAL.format(index))
        previews.append(page.get_attribute("#preview", "src"))
        if index == 1:
            page.screenshot(path=tmp_path / "demo-page-forming.png")
        expect(page.locator("#step-label")).to_contain_text("of 8")
        expect(page.locator("#gallery .card")).to_have_count(0)
        held_runner.go()
    page.wait_for_selector('#preview[data-kind="final"]')
    page.screenshot(path=tmp_path / "demo-page.png", full_page=True)

    assert len(set(previews)) == 3, "each preview must be a different image"
    card = page.locator("#gallery .card")
    expect(card).to_have_count(1)
    expect(card.locator(".facts")).to_contain_text("seed ")
    expect(card.locator(".facts")).to_contain_text("8 steps")
    final_src = page.get_attribute("#preview", "src")
    assert final_src not in previews
    assert card.locator("img").get_attribute("src") == final_src
    assert page.evaluate("document.querySelector('#gallery .card img').naturalWidth") > 0
    download = card.locator("a.download").get_attribute("download", timeout=0)
    assert download is not None and download.endswith(".png")
    expect(page.locator("#step-label")).to_contain_text("done")


def test_cancel_stops_the_job_and_says_so(page: Page, held_runner: HeldRunner) -> None:
    start(page, "a storm over the sea")
    page.wait_for_selector(PARTIAL.format(0))
    page.click("#cancel")
    expect(page.locator("#message")).to_contain_text("cancelled")
    expect(page.locator("#stage")).to_have_attribute("data-state", "cancelled")
    expect(page.locator("#generate")).to_be_enabled()
    held_runner.free()
    expect(page.locator("#gallery .card")).to_have_count(0)


def test_reload_mid_job_resumes_and_finishes(page: Page, held_runner: HeldRunner) -> None:
    start(page, "a fox in the snow")
    page.wait_for_selector(PARTIAL.format(0))
    assert "#job=imgjob_" in page.url
    page.reload()
    page.wait_for_selector(PARTIAL.format(0))
    expect(page.locator("#stage")).to_have_attribute("data-state", "running")
    expect(page.locator("#prompt")).to_have_value("a fox in the snow")
    held_runner.free()
    page.wait_for_selector('#preview[data-kind="final"]')
    expect(page.locator("#gallery .card")).to_have_count(1)
    expect(page.locator("#gallery .card .prompt")).to_have_text("a fox in the snow")
    assert "#job=" not in page.url


def test_bad_request_is_shown_as_a_readable_message(page: Page) -> None:
    page.fill("#prompt", "x")
    page.fill("#seed", "-5")
    page.click("#generate")
    expect(page.locator("#message")).to_contain_text("seed")
    expect(page.locator("#stage")).to_have_attribute("data-state", "error")


class KeyRequired:
    """Stands in for the server's API keys: `/v1/*` needs `Authorization: Bearer <key>`,
    or, where a browser cannot send headers, `?api_key=<key>`; result files stay open, as
    their unguessable names are the capability. Records what it let in by query."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key
        self.by_query: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path.startswith("/v1/") and not path.startswith("/v1/images/files/"):
            bearer = dict(scope["headers"]).get(b"authorization") == f"Bearer {self.key}".encode()
            query = parse_qs(scope["query_string"].decode()).get("api_key") == [self.key]
            if query:
                self.by_query.append(scope["path"])
            if not (bearer or query):
                body = error_body(
                    "invalid api key", type="authentication_error", code="invalid_api_key"
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def test_page_asks_for_the_api_key_then_uses_it_for_calls_and_events(
    browser: Browser, tmp_path: Path
) -> None:
    guarded = KeyRequired(create_app(make_settings(tmp_path), FakeEngine()), key="sk-test")
    with live_server(guarded) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        page.fill("#prompt", "a key")
        page.click("#generate")
        expect(page.locator("#message")).to_contain_text("API key")
        expect(page.locator("#api-key")).to_be_visible()
        page.fill("#api-key", "sk-test")
        page.click("#generate")
        page.press("#api-key", "Enter")
        expect(page.locator("#api-key")).to_be_hidden()
        expect(page.locator("#gallery .card")).to_have_count(1)
        context.close()
    assert guarded.by_query and all(path.endswith("/events") for path in guarded.by_query)


def test_page_fits_a_small_phone_screen_without_sideways_scrolling(
    browser: Browser, page_server: str
) -> None:
    context = browser.new_context(viewport={"width": 320, "height": 640})
    page = context.new_page()
    # --model may name a local folder, and /health reports it as the model.
    model = "/srv/models/black-forest-labs--FLUX.1-dev/snapshots/0123456789abcdef"
    page.route("**/health", lambda route: route.fulfill(json={"status": "ok", "model": model}))
    page.goto(page_server)
    expect(page.locator("#model")).to_have_text(model)
    expect(examples(page)).to_have_count(EXAMPLES_SHOWN)
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    canvas = page.locator("#canvas").bounding_box()
    stage = page.locator("#stage").bounding_box()
    form = page.locator("#form").bounding_box()
    chips = [chip.bounding_box() for chip in examples(page).all()]
    context.close()
    assert widths[0] <= widths[1], "the page scrolls sideways on a phone"
    assert canvas is not None and stage is not None
    assert canvas["x"] + canvas["width"] <= stage["x"] + stage["width"]
    assert form is not None
    right = form["x"] + form["width"]
    assert all(chip is not None and chip["x"] + chip["width"] <= right for chip in chips)


def examples(page: Page) -> Locator:
    """The example prompt buttons under the prompt box."""
    return page.get_by_role("group", name="example prompts").get_by_role("button")


def test_example_prompts_from_the_model_fill_the_prompt_box_without_generating(
    page: Page, held_runner: HeldRunner
) -> None:
    posts = job_posts(page)
    offered = held_runner.profile.example_prompts[:EXAMPLES_SHOWN]
    assert offered, "the embedded model offers example prompts"
    expect(examples(page)).to_have_text(list(offered))
    examples(page).first.click()
    expect(page.locator("#prompt")).to_have_value(offered[0])
    expect(page.locator("#prompt")).to_be_focused()
    examples(page).nth(1).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_value(offered[1])
    expect(page.locator("#stage")).to_have_attribute("data-state", "idle")
    assert posts == []


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 200, "json": {"object": "list", "data": [{"id": "flux.1-dev"}]}},
        {"status": 503, "json": error_body("down", type="server_error")},
    ],
    ids=["a model without examples", "a failed call"],
)
def test_without_the_models_examples_the_page_offers_its_own(
    browser: Browser, page_server: str, answer: dict[str, Any]
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.route("**/v1/models", lambda route: route.fulfill(**answer))
    page.goto(page_server)
    expect(examples(page)).to_have_count(EXAMPLES_SHOWN)
    expect(examples(page).first).to_have_text("a lighthouse at dusk, watercolor")
    examples(page).first.click()
    expect(page.locator("#prompt")).to_have_value("a lighthouse at dusk, watercolor")
    context.close()


def job_posts(page: Page) -> list[str]:
    """The bodies of the job submissions the page sends, as it sends them."""
    posts: list[str] = []
    page.on(
        "request",
        lambda request: (
            posts.append(request.post_data or "")
            if request.method == "POST" and request.url.endswith("/v1/images/jobs")
            else None
        ),
    )
    return posts


def test_ctrl_enter_during_a_job_does_not_start_a_second_one(
    page: Page, held_runner: HeldRunner
) -> None:
    posts = job_posts(page)
    start(page, "one at a time")
    page.wait_for_selector(PARTIAL.format(0))
    page.press("#prompt", "Control+Enter")
    expect(page.locator("#generate")).to_be_disabled()
    held_runner.free()
    page.wait_for_selector('#preview[data-kind="final"]')
    expect(page.locator("#gallery .card")).to_have_count(1)
    assert len(posts) == 1


def test_a_new_job_clears_the_last_image_and_pulses_while_it_waits(
    page: Page, held_runner: HeldRunner
) -> None:
    held_runner.free()
    start(page, "the first picture")
    page.wait_for_selector('#preview[data-kind="final"]')
    held: list[Route] = []
    page.route("**/v1/images/jobs", lambda route: held.append(route))
    page.fill("#prompt", "the second picture")
    page.click("#generate")
    expect(page.locator("#step-label")).to_have_text("submitting")
    assert page.evaluate("document.querySelector('#preview').hasAttribute('src')") is False
    expect(page.locator("#placeholder")).to_be_visible()
    assert page.evaluate("getComputedStyle(document.querySelector('#bar-fill')).width") != "0px"
    while not held:
        page.wait_for_timeout(10)
    held[0].continue_()
    page.unroute("**/v1/images/jobs")
    page.wait_for_selector('#preview[data-kind="final"]')
    expect(page.locator("#gallery .card")).to_have_count(2)


def test_screen_readers_hear_names_and_progress_but_not_the_ticking_clock(page: Page) -> None:
    expect(page.get_by_role("progressbar", name="progress")).to_be_attached()
    expect(page.get_by_role("button", name="random seed")).to_be_visible()
    live = "(id) => document.getElementById(id).closest('[aria-live]:not([aria-live=off])')"
    assert page.evaluate(live, "elapsed") is None
    assert page.evaluate(live, "step-label") is not None


def test_a_wrong_api_key_is_called_wrong_and_its_field_gets_the_focus(
    browser: Browser, tmp_path: Path
) -> None:
    guarded = KeyRequired(create_app(make_settings(tmp_path), FakeEngine()), key="sk-test")
    with live_server(guarded) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        page.click("#key-box summary")
        page.fill("#api-key", "sk-typo")
        page.fill("#prompt", "a key")
        page.click("#generate")
        expect(page.locator("#message")).to_contain_text("did not accept")
        expect(page.locator("#api-key")).to_be_focused()
        context.close()


def test_a_job_the_server_no_longer_knows_is_reported_lost(
    page: Page, held_runner: HeldRunner
) -> None:
    held_runner.free()
    gone = error_body(
        "this job does not exist or has expired",
        type="invalid_request_error",
        code="job_not_found",
    )
    # What a watcher meets after the server restarted: events and job both answer 404.
    page.route("**/v1/images/jobs/**", lambda route: route.fulfill(status=404, json=gone))
    start(page, "lost on a restart")
    expect(page.locator("#message")).to_contain_text("restarted")
    expect(page.locator("#step-label")).to_have_text("lost")
    expect(page.locator("#stage")).to_have_attribute("data-state", "error")
    expect(page.locator("#generate")).to_be_enabled()


def test_cancel_that_arrives_after_the_image_keeps_the_gallery_card_whole(
    page: Page, held_runner: HeldRunner
) -> None:
    held: list[Route] = []

    def hold_cancels(route: Route) -> None:
        if route.request.method == "DELETE":
            held.append(route)
        else:
            route.continue_()

    page.route("**/v1/images/jobs/*", hold_cancels)
    page.click('label:has(input[value="4:3"])')
    start(page, "finished first")
    page.wait_for_selector(PARTIAL.format(0))
    page.click("#cancel")
    while not held:
        page.wait_for_timeout(10)
    held_runner.free()
    page.wait_for_selector('#preview[data-kind="final"]')
    held[0].continue_()
    expect(page.locator("#cancel")).to_be_enabled()
    card = page.locator("#gallery .card")
    expect(card).to_have_count(1)
    expect(card.locator(".prompt")).to_have_text("finished first")
    page.click('label:has(input[value="1:1"])')
    card.locator(".reuse").click()
    expect(page.locator('input[name="aspect"][value="4:3"]')).to_be_checked()
    expect(page.locator("#message")).to_be_hidden()


def test_every_control_shapes_the_request_it_sends(page: Page, held_runner: HeldRunner) -> None:
    held_runner.free()
    posts = job_posts(page)
    page.fill("#prompt", "  every control  ")
    page.click('label:has(input[value="3:2"])')
    page.select_option("#resolution", "2K")
    page.fill("#steps", "12")
    page.fill("#seed", "42")
    page.press("#seed", "Enter")
    expect(page.locator("#step-label")).to_contain_text("done")
    page.click("#dice")
    page.fill("#steps", "0")
    page.select_option("#resolution", "0.5K")
    page.click("#generate")
    page.wait_for_selector('#preview[data-kind="final"]')
    first, second = (json.loads(body) for body in posts)
    assert first["prompt"] == "every control"
    assert (first["aspect_ratio"], first["resolution"]) == ("3:2", "2K")
    assert (first["num_inference_steps"], first["seed"]) == (12, 42)
    assert second["seed"] != 42 and str(second["seed"]) == page.input_value("#seed")
    assert "num_inference_steps" not in second and second["resolution"] == "0.5K"
    expect(page.locator("#step-label")).to_contain_text(f"seed {second['seed']}")


def test_with_a_lora_folder_the_page_offers_a_lora_picker_and_sends_the_chosen_ones(
    browser: Browser, page_server: str, model_cache: Path, tmp_path: Path
) -> None:
    context = browser.new_context()
    plain = context.new_page()
    plain.goto(page_server)
    expect(examples(plain)).to_have_count(EXAMPLES_SHOWN)
    expect(plain.locator("#lora-box")).to_be_hidden()
    folder = Path(__file__).parent.parent / "examples" / "loras"
    settings = make_settings(tmp_path, max_pixels=256 * 256, lora_dir=folder)
    runner = create_flux_runner(ModelSpec(cache_dir=model_cache, loras=LoraSpec()))
    with live_server(create_app(settings, ThreadedEngine(runner, max_queued=4))) as url:
        page = context.new_page()
        posts = job_posts(page)
        page.goto(url)
        expect(page.locator("#loras .lora")).to_have_count(2)
        page.get_by_label("pastel", exact=True).check()
        page.get_by_label("pastel scale").fill("0.5")
        start(page, "a red circle on a blue background")
        page.wait_for_selector('#preview[data-kind="final"]')
        expect(page.locator("#gallery .card .facts")).to_contain_text("pastel ×0.5")
        page.get_by_label("pastel", exact=True).uncheck()
        page.get_by_label("outline", exact=True).check()
        page.locator("#gallery .card .reuse").click()
        expect(page.get_by_label("pastel", exact=True)).to_be_checked()
        expect(page.get_by_label("pastel scale")).to_have_value("0.5")
        expect(page.get_by_label("outline", exact=True)).not_to_be_checked()
    context.close()
    assert json.loads(posts[0])["loras"] == [{"path": "pastel.safetensors", "scale": 0.5}]
