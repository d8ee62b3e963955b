"""The README and the pages under docs/: their links lead somewhere, and the README's
first examples work as written against a real server on the embedded model."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from stream.app import create_app
from tests.conftest import make_settings
from tests.servers import live_server

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_URL = "http://127.0.0.1:8000"
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where links are links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        base = slug(heading)
        name, n = base, 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text()))
        if not re.match(r"[a-z]+:", target)
    ]


def test_the_slug_of_a_heading_is_githubs_anchor() -> None:
    assert slug("Request fields (`/v1/images/generations`)") == "request-fields-v1imagesgenerations"
    assert slug("Jobs: generations you can watch from a browser") == (
        "jobs-generations-you-can-watch-from-a-browser"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no file {file}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")
    }
    assert set(PAGES[1:]) - linked == set()


def test_the_readme_shows_the_demo_page_mid_generation() -> None:
    assert "docs/page.png" in relative_links(ROOT / "README.md")
    assert (ROOT / "docs" / "page.png").read_bytes().startswith(b"\x89PNG")


def readme_example(language: str, holding: str) -> str:
    """The README's first code block in `language` ('' for a plain block) that holds
    `holding`."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    return next(code for lang, code in blocks if lang == language and holding in code)


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine = ThreadedEngine(create_flux_runner(ModelSpec(cache_dir=model_cache)), max_queued=4)
    with live_server(create_app(make_settings(tmp_path_factory.mktemp("docs")), engine)) as url:
        yield url


def test_the_readme_sdk_example_streams_three_previews_then_the_image(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = readme_example("python", "stream=True")
    assert README_URL in code
    exec(compile(code.replace(README_URL, server), "README.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "image_generation.partial_image 0",
        "image_generation.partial_image 1",
        "image_generation.partial_image 2",
        "image_generation.completed None",
    ]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_example_streams_two_previews_then_the_image(server: str) -> None:
    curl = readme_example("", "curl -N")
    assert README_URL in curl
    out = subprocess.run(
        curl.replace(README_URL, server), shell=True, capture_output=True, text=True, timeout=120
    ).stdout
    events = re.findall(r"^event: (.+)$", out, re.MULTILINE)
    assert events == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
