import subprocess
import sys


def test_http_side_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys, stream, stream.app, stream.cli, stream.serving;"
        "bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_model_fails_start_up_with_one_clear_line(tmp_path: object) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream",
            "--model",
            "/nonexistent/flux",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "could not load model '/nonexistent/flux'" in lines[0]
    assert "Traceback" not in done.stderr


def test_missing_safety_checker_model_fails_start_up_with_one_clear_line(tmp_path: object) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream",
            "--safety-checker-model",
            "/nonexistent/checker",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "could not load the safety checker from /nonexistent/checker" in lines[0]


def test_unreadable_api_keys_file_fails_start_up_with_one_clear_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "--api-keys-file", "/nonexistent/keys.txt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        "fluxstream: cannot read the API keys file /nonexistent/keys.txt: No such file or directory"
    )


def test_tiny_preview_default_without_a_tiny_vae_fails_start_up_clearly() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "--preview-decoder", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "fluxstream: --preview-decoder tiny needs --preview-tiny-vae"
