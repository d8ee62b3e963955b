"""Start-up as a user sees it: one clear line and exit code 2 for what cannot work."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import get_origin

import httpx
import pytest

from stream.cli import load_settings
from stream.settings import Settings
from tests.servers import free_port, wait_healthy


def test_http_side_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys, stream, stream.app, stream.cli, stream.serving;"
        "bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def start_up_failure(*flags: str, env: dict[str, str] | None = None) -> str:
    """Start `python -m stream` with `flags`; it must exit 2 with exactly one stderr line."""
    done = subprocess.run(
        [sys.executable, "-m", "stream", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_missing_model_folder_fails_start_up_saying_there_is_no_such_folder(
    tmp_path: Path,
) -> None:
    line = start_up_failure("--model", "/nonexistent/flux", "--cache-dir", str(tmp_path))
    assert line == "fluxstream: could not load model '/nonexistent/flux': there is no such folder"


def test_a_cache_dir_the_kontext_twin_cannot_be_made_in_fails_start_up_with_one_line(
    tmp_path: Path,
) -> None:
    """The embedded model ships in the repository; its Kontext twin is made in the cache."""
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"
    assert start_up_failure("--model", "embedded-kontext", "--cache-dir", str(cache)) == (
        f"fluxstream: cannot build the embedded model in the cache folder {cache}: Not a directory"
    )


def test_hub_id_not_in_the_cache_fails_start_up_saying_nothing_is_downloaded(
    tmp_path: Path,
) -> None:
    line = start_up_failure("--model", "black-forest-labs/FLUX.1-dev", "--cache-dir", str(tmp_path))
    assert "could not load model 'black-forest-labs/FLUX.1-dev' offline" in line
    assert "already in the local Hugging Face cache" in line


def diffusers_folder(folder: Path, pipeline: str, transformer: dict[str, object]) -> Path:
    """The configs of a diffusers model folder (no weights: start-up refuses it before)."""
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    return folder


def test_a_diffusers_folder_of_another_pipeline_fails_start_up_naming_it(
    tmp_path: Path,
) -> None:
    folder = diffusers_folder(
        tmp_path / "sd", "StableDiffusionPipeline", {"_class_name": "UNet2DConditionModel"}
    )
    line = start_up_failure("--model", str(folder), "--cache-dir", str(tmp_path))
    assert line == (f"fluxstream: {folder} holds a StableDiffusionPipeline, not a FLUX model")


def test_a_flux_fill_model_fails_start_up_instead_of_failing_every_request(
    tmp_path: Path,
) -> None:
    folder = diffusers_folder(
        tmp_path / "fill",
        "FluxFillPipeline",
        {"_class_name": "FluxTransformer2DModel", "in_channels": 384, "out_channels": 64},
    )
    line = start_up_failure("--model", str(folder), "--cache-dir", str(tmp_path))
    assert line == (
        f"fluxstream: {folder} holds a FluxFillPipeline, whose transformer takes 384 "
        "input channels; fluxstream serves FLUX text-to-image and Kontext models (64)"
    )


def test_missing_safety_checker_model_fails_start_up_with_one_clear_line(tmp_path: Path) -> None:
    line = start_up_failure(
        "--safety-checker-model", "/nonexistent/checker", "--cache-dir", str(tmp_path)
    )
    assert "could not load the safety checker from /nonexistent/checker" in line


def test_unreadable_api_keys_file_fails_start_up_with_one_clear_line() -> None:
    assert start_up_failure("--api-keys-file", "/nonexistent/keys.txt") == (
        "fluxstream: cannot read the API keys file /nonexistent/keys.txt: No such file or directory"
    )


def test_tiny_preview_default_without_a_tiny_vae_fails_start_up_clearly() -> None:
    assert start_up_failure("--preview-decoder", "tiny") == (
        "fluxstream: --preview-decoder tiny needs --preview-tiny-vae"
    )


@pytest.mark.parametrize("device", ["foo", "meta"])
def test_a_device_that_is_not_cpu_or_cuda_fails_start_up_with_one_line(
    tmp_path: Path, device: str
) -> None:
    assert start_up_failure("--device", device, "--cache-dir", str(tmp_path)) == (
        f"fluxstream: --device must be auto, cpu, cuda or cuda:N; got {device!r}"
    )


def test_refused_speedup_stops_start_up_with_one_line(tmp_path: Path) -> None:
    assert start_up_failure("--offload", "model", "--cache-dir", str(tmp_path)) == (
        "fluxstream: --offload model moves weights between the CPU and a GPU; "
        "with device cpu there is nothing to offload to"
    )


def test_a_bad_setting_fails_start_up_with_one_line_naming_flag_and_variable() -> None:
    assert start_up_failure("--max-queued", "0", "--keepalive-s", "soon") == (
        "fluxstream: --max-queued (FLUXSTREAM_MAX_QUEUED) '0': input should be greater than "
        "or equal to 1; --keepalive-s (FLUXSTREAM_KEEPALIVE_S) 'soon': input should be a "
        "valid number, unable to parse string as a number"
    )


def test_no_limit_is_null_in_the_environment_as_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUXSTREAM_MAX_RUN_S", "null")
    assert load_settings(["--max-queue-wait-s", "null"]).max_run_s is None
    assert load_settings(["--max-queue-wait-s", "null"]).max_queue_wait_s is None


def test_a_bad_secret_setting_is_named_without_showing_the_secret() -> None:
    line = start_up_failure("--webhook-secret", "whsec_not!base64-leaked")
    assert line.startswith("fluxstream: --webhook-secret (FLUXSTREAM_WEBHOOK_SECRET): ")
    assert "leaked" not in line


LIST_SETTINGS = [
    name for name, field in Settings.model_fields.items() if get_origin(field.annotation) is tuple
]


@pytest.mark.parametrize("name", LIST_SETTINGS)
@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("sk-one", ("sk-one",)),
        ("sk-one,sk-two", ("sk-one", "sk-two")),
        (" sk-one , sk-two ,", ("sk-one", "sk-two")),
        ('["sk-a", "sk-b"]', ("sk-a", "sk-b")),
        ('["a,b"]', ("a,b",)),
        ("[]", ()),
    ],
)
def test_a_list_variable_is_comma_separated_values_or_json(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, items: tuple[str, ...]
) -> None:
    monkeypatch.setenv(f"FLUXSTREAM_{name.upper()}", text)
    assert getattr(load_settings([]), name) == items


def test_the_list_settings_are_all_found_for_the_test_above() -> None:
    assert {"api_keys", "cors_allow_origins", "webhook_allowed_hosts"} <= set(LIST_SETTINGS)


@pytest.mark.parametrize("text", ["", " , ", '["sk-leaked"'])
def test_an_empty_or_broken_list_variable_fails_start_up_with_one_line_without_its_value(
    text: str,
) -> None:
    line = start_up_failure(env={"FLUXSTREAM_API_KEYS": text})
    assert line == (
        "fluxstream: FLUXSTREAM_API_KEYS is not a list: give comma-separated values (a,b) "
        """or JSON ('["a", "b"]', '[]' for none)"""
    )


def test_an_unknown_log_level_fails_start_up_with_one_line() -> None:
    assert start_up_failure("--log-level", "verbose") == (
        "fluxstream: --log-level (FLUXSTREAM_LOG_LEVEL) 'verbose': input should be "
        "'debug', 'info', 'warning' or 'error'"
    )


def test_help_names_every_setting_as_flag_and_variable_with_a_readable_default() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    flat = " ".join(done.stdout.split())
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in flat
        assert f"FLUXSTREAM_{name.upper()}" in flat
    assert "<lambda>" not in flat
    assert "default: <host>-<pid>" in flat


def test_log_level_debug_is_for_the_servers_own_loggers_not_every_librarys() -> None:
    code = (
        "import logging; from stream.logs import configure_logging; configure_logging('debug');"
        "own = [logging.getLogger(n).isEnabledFor(10) for n in ('stream.app', 'pipeline.engine',"
        " 'fluxstream.access')]; assert all(own), own;"
        "assert not logging.getLogger('sse_starlette.sse').isEnabledFor(10)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_real_servers_log_has_access_lines_and_no_api_key_or_prompt(model_cache: Path) -> None:
    """At debug level too: sse-starlette would log every frame, prompt and image included."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["--port", str(port), "--no-warmup", "--cache-dir", str(model_cache)]
    server = subprocess.Popen(
        [sys.executable, "-m", "stream", *flags, "--api-keys", "sk-leaked", "--log-level", "debug"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_healthy(url, server, timeout_s=120)
        assert httpx.get(f"{url}/v1/models?api_key=sk-leaked").status_code == 200
        body = {"prompt": "a-secret-prompt", "size": "64x64", "num_inference_steps": 2}
        auth = {"Authorization": "Bearer sk-leaked"}
        for stream in (False, True):
            httpx.post(
                f"{url}/v1/images/generations", json={**body, "stream": stream}, headers=auth
            )
    finally:
        server.send_signal(signal.SIGTERM)
        log, _ = server.communicate(timeout=60)
    assert "sk-leaked" not in log and "a-secret-prompt" not in log
    assert '"GET /v1/models?api_key=*** HTTP/1.1" 200' in log, log
    access = [line for line in log.splitlines() if "fluxstream.access" in line]
    assert len(access) == 2 and all("outcome=ok" in line for line in access)


def test_the_configuration_page_names_every_setting_and_only_settings() -> None:
    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    table = page[page.index("| setting | default |") :].split("\n\n")[0]
    named = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert named == set(Settings.model_fields)
