"""The ordered, bounded pools of the data passes: input order kept, in-flight work bounded, a slow item does
not stall the other threads."""
import threading
import time

from megacrystal.data.workers import ProcessPool, ThreadPool


def _square(x):
    return x * x


def _noop_init():
    pass


def test_pools_keep_input_order():
    for pool in (ThreadPool(2, _square), ProcessPool(2, _square, _noop_init, ()), ProcessPool(1, _square,
                                                                                              _noop_init, ())):
        try:
            assert list(pool.map(range(50))) == [x * x for x in range(50)]
        finally:
            pool.close()


def test_thread_pool_reads_a_bounded_window_ahead():
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    pool = ThreadPool(2, _square, ahead=3)
    try:
        for i, _ in enumerate(pool.map(items())):
            assert len(read) <= i + 1 + 2 * 3  # consumed + the window
    finally:
        pool.close()


def test_slow_item_does_not_stall_the_other_thread():
    """While item 0 blocks one thread, the other keeps working on the items behind it."""
    release = threading.Event()
    done = []

    def work(i):
        if i == 0:
            release.wait(5)
        done.append(i)
        return i

    pool = ThreadPool(2, work, ahead=8)
    try:
        results = pool.map(range(12))
        deadline = time.monotonic() + 5
        starter = threading.Thread(target=lambda: next(results))
        starter.start()
        while len(done) < 11 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(done) == list(range(1, 12))  # everything behind the slow item finished meanwhile
        release.set()
        starter.join()
        assert list(results) == list(range(1, 12))
    finally:
        release.set()
        pool.close()
