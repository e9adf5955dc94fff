"""Running test code on several threads at once."""
import threading


def run_in_threads(work, count: int, timeout: float = 120.0) -> None:
    """``work(i)`` for ``i < count``, each on its own thread, all released together; re-raises
    the first error in the caller's thread and fails if a thread is still running after
    ``timeout`` seconds."""
    errors, barrier = [], threading.Barrier(count)

    def body(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    if errors:
        raise errors[0]
