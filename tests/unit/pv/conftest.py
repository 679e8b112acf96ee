from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmcore.memory import GuestMemory
from pv.queue import SplitQueue
from pv.testing import FakeHealth, MockSplitQueue, make_guest_memory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_guest_memory()
    yield m
    m.close()


@pytest.fixture
def mock(mem: GuestMemory) -> MockSplitQueue:
    return MockSplitQueue(mem, 16, seed=1)


@pytest.fixture
def queue(mem: GuestMemory, mock: MockSplitQueue) -> Iterator[SplitQueue]:
    q = SplitQueue(mem, mock.config())
    q.validate()
    yield q
    q.close()


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()
