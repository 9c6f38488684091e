"""The command line (app/cli.py, app/server.py) and the docs pages (app/docs.py), through real processes.

``python -m app --help`` prints the options without starting a server; a flag beats its
environment variable; the ``ready`` line comes once requests are answered (one process, and a
supervisor of two); ``dropout-serve`` hands its other commands to ``python -m training``; and
``/docs`` and ``/redoc`` load nothing from outside the service.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.cli import env_name, flag_name, parser
from app.main import create_app
from app.schemas import DIGIT_ZERO
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready: http://(\S+):(\d+)/docs")


def run_app(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Started:
    """``python -m app ARGS`` in a real process, read line by line until its ``ready`` line."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            assert line, "the server exited before it was ready:\n" + "".join(self.lines)[-3000:]
            self.lines.append(line)
            if found := READY.search(line):
                self.host, self.port = found.group(1), int(found.group(2))
                return
        pytest.fail("no ready line within 120 s:\n" + "".join(self.lines)[-3000:])

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=40)
        self.lines += self.process.stdout.readlines()
        return code


def test_help_prints_every_option_and_starts_no_server():
    started = time.monotonic()
    result = run_app("--help")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20  # it printed and left; no server, no TensorFlow
    for option in ("--host", "--port", "--grpc-port", "--workers", "--model-dir", "--default-model", "--log-format"):
        assert option in result.stdout
    assert "DROPOUT_SERVE_GRPC_PORT" in result.stdout and "default: 8001" in result.stdout
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_every_setting_has_a_flag_except_secrets():
    flags = {action.dest for action in parser()._actions}
    for field, info in Settings.model_fields.items():
        assert (env_name(field, info) in flags) != (field == "api_keys"), field
    assert flag_name(env_name("models_config", Settings.model_fields["models_config"])) == "--model-config"


def test_a_bad_flag_value_is_a_clear_error_naming_the_flag():
    result = run_app("--port", "eighty", "--grpc-port", "-1")
    assert result.returncode == 2
    assert "--port:" in result.stderr and "--grpc-port:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_flag_wins_over_its_environment_variable_and_the_ready_line_comes_when_it_answers(tiny_classifier_dir):
    repository = tiny_classifier_dir.parents[1]
    env = {
        "DROPOUT_SERVE_MODEL_DIR": "/nonexistent",
        "DROPOUT_SERVE_PORT": "1",  # the ready line would name it if the flag did not win
        "DROPOUT_SERVE_HOST": "127.0.0.1",
        "DROPOUT_SERVE_LOG_FORMAT": "text",
    }
    server = Started("--model-dir", str(repository), "--port", "0", "--log-format", "json", env=env)
    try:
        assert server.host == "127.0.0.1" and server.port not in (0, 1)
        url = f"http://127.0.0.1:{server.port}"
        # Ready means ready: the model answers, the health check agrees, at once.
        assert httpx.get(f"{url}/health/ready").status_code == 200
        answer = httpx.post(f"{url}/predict", json={"instances": [DIGIT_ZERO]})
        assert answer.status_code == 200 and answer.json()["model"] == "tiny"
        assert httpx.get(f"{url}/docs").status_code == 200
    finally:
        assert server.stop() == 0
    text = "".join(server.lines)
    assert '"message": "ready: http://127.0.0.1:' in text  # --log-format json beat LOG_FORMAT=text
    # TensorFlow's start-up notes about CPU instructions (they read like errors) are not shown.
    assert "rebuild TensorFlow" not in text


def test_several_workers_say_ready_once_all_of_them_answer(tiny_classifier_dir):
    env = {"DROPOUT_SERVE_MODEL_DIR": str(tiny_classifier_dir.parents[1]), "DROPOUT_SERVE_ACCESS_LOG": "false"}
    server = Started("--host", "127.0.0.1", "--port", "0", "--workers", "2", env=env)
    try:
        url = f"http://127.0.0.1:{server.port}"
        codes = {httpx.post(f"{url}/predict", json={"instances": [DIGIT_ZERO]}).status_code for _ in range(8)}
        assert codes == {200}
        assert "".join(server.lines).count("Application startup complete") == 2
    finally:
        assert server.stop() == 0
    assert "".join(server.lines).count("ready: http://") == 1


def console(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from app.cli import console; sys.exit(console(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dropout_serve_lists_its_commands_and_delegates_them():
    listing = console("--help")
    assert listing.returncode == 0
    for command in ("serve", "train", "import", "evaluate"):
        assert command in listing.stdout
    assert console().returncode == 2  # no command: the listing, as an error
    serve_help = console("serve", "--help")
    assert serve_help.returncode == 0 and "--grpc-port" in serve_help.stdout
    train_help = console("train", "--help")
    assert train_help.returncode == 0 and "--architecture" in train_help.stdout  # python -m training's parser
    evaluate = console("evaluate", "no-such-model", "--artifacts", str(ROOT / "no-such-repository"))
    assert evaluate.returncode == 2 and "no version" in evaluate.stderr


def test_the_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dropout-serve": "app.cli:console"}


# --- /docs and /redoc without the internet ------------------------------------------------


@pytest.fixture(scope="module")
def docs_client(tmp_path_factory):
    settings = Settings(model_dir=tmp_path_factory.mktemp("empty"), poll_seconds=0, api_keys="k1")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_what_the_service_serves(docs_client, page):
    """Every script, stylesheet, icon and the OpenAPI document a page names is a local URL that
    answers 200, without an API key even when keys are configured."""
    html = docs_client.get(page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
    urls += re.findall(r"""(?:url|spec-url)["']?\s*[:=]\s*["']([^"']+)["']""", html.text)
    assert any(u.endswith(".js") for u in urls) and "/openapi.json" in urls, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        answer = docs_client.get(url)
        assert answer.status_code == 200, url
        assert len(answer.content) > 1000, url
    assert "cdn." not in html.text and "fonts.googleapis" not in html.text
