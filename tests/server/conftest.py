"""A server over a model, run in a thread of the test process on 127.0.0.1 and a free port; stopped by
its own handle at the end of the test."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from llmc.loader import load_model
from llmc.server.serve import Server, ServeConfig, make_server
from tests.helpers import STORIES


@contextmanager
def running(path, model=None, **config) -> Iterator[Server]:
    server = make_server(path, ServeConfig(host="127.0.0.1", port=0, **config), model=model)
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="session")
def stories_model():
    return load_model(STORIES)
