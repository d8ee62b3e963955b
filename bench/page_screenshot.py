"""The README's picture of the demo page mid-generation (docs/page.png).

Serves the embedded model on a free port, opens the demo page in Debian's Chromium (driven
by Playwright, as tests/test_web_page.py does), fills the gallery with --gallery finished
images (at the model's own size and steps), then clicks one of the model's example
prompts and generates it at --resolution (0.5K: 512x512) with --steps steps. The job is
held after its preview number --hold-at (counting from 0; the page asks for 3) while the
screenshot is taken, so the picture shows a preview forming whatever the machine's speed;
then it is let go to finish.

    .venv/bin/python -m bench.page_screenshot [--out docs/page.png] [--resolution 0.5K]
        [--steps 40] [--seed 3] [--example 0] [--hold-at 1] [--gallery 2]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from playwright.sync_api import Page, ViewportSize, sync_playwright

from pipeline.engine import Emit, StopRequested, ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import Event, Job, ModelProfile, Preview, Result
from pipeline.loading import ModelSpec
from pipeline.runner import FluxRunner
from stream.app import create_app
from stream.settings import Settings
from tests.servers import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
# The page fades a preview's blur in over 400 ms (style.css); wait it out.
SETTLE_MS = 800


class HoldingRunner:
    """The real runner; once `arm`ed, the next job waits after preview `index` until
    `release`."""

    def __init__(self, runner: FluxRunner) -> None:
        self._runner = runner
        self._index: int | None = None
        self._released = threading.Event()

    @property
    def profile(self) -> ModelProfile:
        return self._runner.profile

    def arm(self, index: int) -> None:
        self._index = index

    def release(self) -> None:
        self._index = None
        self._released.set()

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        def emit_then_hold(event: Event) -> None:
            emit(event)
            if isinstance(event, Preview) and event.index == self._index:
                self._released.wait(timeout=300)

        return self._runner.run(job, emit_then_hold, stop_requested)


def generate(page: Page, prompt: str, resolution: str, steps: int, seed: int) -> None:
    """Fill the form as a person would, and press Generate (`steps` 0: the model's own)."""
    page.fill("#prompt", prompt)
    page.select_option("#resolution", resolution)
    page.fill("#seed", str(seed))
    page.eval_on_selector(
        "#steps", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')) }", str(steps)
    )
    page.click("#generate")


def capture(page: Page, runner: HoldingRunner, args: argparse.Namespace) -> None:
    """Fill the gallery, then screenshot the page while the next job is held mid-way."""
    examples = page.locator("#examples button")
    examples.first.wait_for()
    prompts = examples.all_inner_texts()
    for i in range(args.gallery):
        prompt = prompts[(args.example + 1 + i) % len(prompts)]
        generate(page, prompt, resolution="", steps=0, seed=args.seed + 1 + i)
        page.locator("#gallery .card").nth(i).wait_for()
        page.wait_for_selector('#stage[data-state="done"]')

    runner.arm(args.hold_at)
    try:
        examples.nth(args.example % len(prompts)).click()
        prompt = page.input_value("#prompt")
        generate(page, prompt, args.resolution, steps=args.steps, seed=args.seed)
        page.wait_for_selector(f'#preview[data-kind="partial"][data-index="{args.hold_at}"]')
        page.wait_for_function("document.getElementById('preview').complete")
        page.wait_for_timeout(SETTLE_MS)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
    finally:
        runner.release()
    page.wait_for_selector('#preview[data-kind="final"]')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/page.png"))
    parser.add_argument("--resolution", default="0.5K", help="the Size box: 0.5K, 1K or ''")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--example", type=int, default=0, help="which example prompt to click")
    parser.add_argument("--hold-at", type=int, default=1, help="the preview to hold at (0-2)")
    parser.add_argument("--gallery", type=int, default=2, help="finished images to show first")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")

    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-screenshot-"))
    runner = HoldingRunner(create_flux_runner(ModelSpec(cache_dir=scratch / "cache")))
    settings = Settings(data_dir=scratch / "images", cache_dir=scratch / "cache")
    app = create_app(settings, ThreadedEngine(runner, max_queued=4))
    with live_server(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(120_000)
        page.goto(url)
        capture(page, runner, args)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
