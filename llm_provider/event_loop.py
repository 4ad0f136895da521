"""Which event loop the `emulator` command runs on: uvloop where it is installed, else asyncio's own.

LLMP_EVENT_LOOP=asyncio chooses asyncio's loop all the same (to compare, or to rule uvloop out).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")


class EventLoop(StrEnum):
    AUTO = "auto"
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice is EventLoop.ASYNCIO:
        return None
    try:
        import uvloop
    except ImportError:
        if choice is EventLoop.UVLOOP:
            raise
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    choice = EventLoop(os.environ.get("LLMP_EVENT_LOOP", EventLoop.AUTO))
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
