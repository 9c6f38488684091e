"""The live model repository under load: a real uvicorn process, clients that never pause.

Versions are published, broken, copied in by hand and deleted while eight clients send
requests back to back; not one request may fail, and every answer must come from the version
it names (each version answers its own number).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import Server, publish_versions

REQUEST = {"model": "m", "instances": [[0.0, 0.0, 0.0, 0.0]]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    publish_versions(root, "m", 3)
    return root / "m"


class Load:
    """Clients posting /predict without pause; every (status, version, value) is kept."""

    def __init__(self, url: str, clients: int = 8) -> None:
        self.answers: list[tuple[int, int | None, float | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url,)) for _ in range(clients)]

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                response = client.post("/predict", json=REQUEST)
                if response.status_code == 200:
                    body = response.json()
                    self.answers.append((200, body["version"], body["predictions"][0]["value"]))
                else:
                    self.answers.append((response.status_code, None, None))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def states(url: str) -> dict[int, tuple[str, str]]:
    body = httpx.get(f"{url}/v1/models/m").json()
    return {int(s["version"]): (s["state"], s["status"]["error_message"]) for s in body["model_version_status"]}


def serving(url: str) -> set[int]:
    return {v for v, (state, _) in states(url).items() if state == "AVAILABLE"}


def publish(source: Path, repository: Path, version: int, corrupt: bool = False) -> None:
    """As the artifact contract does: stage beside the versions, then rename into place."""
    staged = repository / "m" / f".staging-{version}"
    shutil.copytree(source / str(min(version, 3)), staged)
    if corrupt:
        (staged / "saved_model.pb").write_bytes(b"\x00 this is not a SavedModel")
    os.rename(staged, repository / "m" / str(version))


@contextmanager
def served(repository: Path) -> Iterator[Server]:
    server = Server(repository, poll_seconds=0.2)
    try:
        wait_for(lambda: httpx.get(f"{server.url}/health/ready").status_code == 200, "ready")
        yield server
    finally:
        server.stop()


def check(load: Load, expected_versions: set[int]) -> None:
    assert len(load.answers) > 100
    failures = [a for a in load.answers if a[0] != 200]
    assert not failures, f"{len(failures)} of {len(load.answers)} requests failed: {failures[:5]}"
    assert all(value == version for _, version, value in load.answers), "an answer came from another version"
    assert {version for _, version, _ in load.answers} == expected_versions


def test_versions_come_and_go_under_load_without_a_failed_request(tmp_path, source):
    shutil.copytree(source / "1", tmp_path / "m" / "1")
    with served(tmp_path) as server, Load(server.url) as load:
        publish(source, tmp_path, 2)
        wait_for(lambda: serving(server.url) == {2}, "version 2 to replace 1")
        publish(source, tmp_path, 3)
        wait_for(lambda: serving(server.url) == {3}, "version 3 to replace 2")
        publish(source, tmp_path, 4, corrupt=True)
        wait_for(lambda: states(server.url).get(4, ("",))[0] == "END", "version 4 to fail")
        assert serving(server.url) == {3}
        shutil.rmtree(tmp_path / "m" / "3")
        wait_for(lambda: serving(server.url) == {2}, "version 2 to serve again once 3 is deleted")
        time.sleep(1)
        final = states(server.url)
    check(load, {1, 2, 3})
    assert load.answers[-1][1] == 2
    state, error = final[4]
    assert state == "END" and error, final
    assert final[2] == ("AVAILABLE", "")


def copy_slowly(source: Path, target: Path, pause: float) -> None:
    """A hand copy into the repository: file by file, the big one in pieces, never settled for long."""
    target.mkdir()
    for path in sorted(source.rglob("*"), key=lambda p: p.name != "saved_model.pb"):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(exist_ok=True)
            continue
        data = path.read_bytes()
        with open(destination, "wb") as out:
            for start in range(0, max(len(data), 1), max(len(data) // 3, 1)):
                out.write(data[start : start + max(len(data) // 3, 1)])
                out.flush()
                time.sleep(pause)


def test_a_half_copied_folder_is_not_served_until_it_is_complete(tmp_path, source):
    shutil.copytree(source / "1", tmp_path / "m" / "1")
    with served(tmp_path) as server, Load(server.url) as load:
        copy_slowly(source / "2", tmp_path / "m" / "2", pause=0.4)
        copied = len(load.answers)
        assert serving(server.url) == {1}
        wait_for(lambda: serving(server.url) == {2}, "version 2 once its copy settled")
        time.sleep(0.5)
    check(load, {1, 2})
    assert all(version == 1 for _, version, _ in load.answers[:copied])
    assert load.answers[-1][1] == 2
