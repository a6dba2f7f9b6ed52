"""The one way the backup verbs run work in parallel: a pool of threads with a bounded
window of tasks in flight, results taken in order on the calling thread.

The window (twice the threads) bounds the memory held by finished results and keeps
every thread busy; taking results in submission order keeps the caller's bookkeeping
single-threaded. On any error, or Ctrl-C, the queued tasks are cancelled and the
running ones finish before it propagates (no thread outlives the call).
"""

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor


def run_window(workers: int, name: str, calls: Iterable[tuple], collect: Callable) -> None:
    """Run each ``(key, func, *args)`` of ``calls`` as ``func(*args)`` on ``workers``
    threads (named ``name``), at most ``2 * workers`` at a time; ``collect(key,
    result)`` on this thread, in the order of ``calls``. A task's exception is raised
    here when its turn comes."""
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        window: deque = deque()
        try:
            for key, func, *args in calls:
                window.append((key, pool.submit(func, *args)))
                if len(window) >= 2 * workers:
                    key, future = window.popleft()
                    collect(key, future.result())
            while window:
                key, future = window.popleft()
                collect(key, future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
