"""Flag: set by the engine thread, awaited by the HTTP event loop (or waited on by a plain thread)."""

import asyncio
import threading


class Flag:
    """A threading.Event that coroutines can await without a thread of their own.

    `set()` may be called from any thread; every coroutine in `wait_async` wakes on its own loop.
    A stream reader uses it as "something changed": wait, `clear()`, then read the new state.
    """

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: nobody waits there any more
                pass

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """True once set; False after `timeout` seconds."""
        event = asyncio.Event()
        with self._lock:
            if self._event.is_set():
                return True
            entry = (asyncio.get_running_loop(), event)
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)
