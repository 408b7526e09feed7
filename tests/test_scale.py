"""What a launch at iNat21's scale relies on, tested small: bounded work queues and a barrier timeout that a
long first preparation does not trip."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from taxadiffusion.config import Config
from taxadiffusion.data.check import bounded_map
from taxadiffusion.train.run_folder import RunPaths
from taxadiffusion.train.trainer import make_accelerator


def test_bounded_map_keeps_the_order_and_at_most_a_window_pending():
    pending, most, lock = [0], [0], threading.Lock()

    def work(x):
        time.sleep(0.001)
        with lock:
            pending[0] -= 1
        return x * x

    def counted(items):
        for x in items:
            with lock:
                pending[0] += 1
                most[0] = max(most[0], pending[0])
            yield x

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(bounded_map(pool, work, counted(range(500)), window=16)) == [x * x for x in range(500)]
    assert most[0] <= 17  # the window, plus the one submitted before the oldest is taken


def test_the_process_group_waits_as_long_as_the_config_says(tmp_path):
    config = Config.from_dict({"train": {"process_group_timeout": 5400}})
    accelerator = make_accelerator(config.train, RunPaths(tmp_path))
    assert accelerator.init_handler.timeout.total_seconds() == 5400
    assert Config.from_dict({}).train.process_group_timeout >= 3600  # a first preparation takes hours at scale
