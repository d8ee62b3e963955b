"""Start-up as a user sees it: one clear line and exit code 2 for what cannot work."""

import subprocess
import sys
from pathlib import Path


def test_http_side_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys, stream, stream.app, stream.cli, stream.serving;"
        "bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def start_up_failure(*flags: str) -> str:
    """Start `python -m stream` with `flags`; it must exit 2 with exactly one stderr line."""
    done = subprocess.run(
        [sys.executable, "-m", "stream", *flags], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_missing_model_fails_start_up_with_one_clear_line(tmp_path: Path) -> None:
    line = start_up_failure("--model", "/nonexistent/flux", "--cache-dir", str(tmp_path))
    assert "could not load model '/nonexistent/flux'" in line


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


def test_refused_speedup_stops_start_up_with_one_line(tmp_path: Path) -> None:
    assert start_up_failure("--offload", "model", "--cache-dir", str(tmp_path)) == (
        "fluxstream: --offload model moves weights between the CPU and a GPU; "
        "with device cpu there is nothing to offload to"
    )
