"""Fault injection for the end-to-end tests: kill a Ray process of a running training run
(found through Ray's state API) once the run's ``metrics.jsonl`` has reached a line count."""

import os
import signal
import threading
import time
from pathlib import Path


def metrics_lines(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def alive_pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", class_name),
                                                ("state", "=", "ALIVE")])]


class Killer(threading.Thread):
    """``plan``: ``[(lines, actor class name), ...]`` in order; for each, wait until the run
    directory's ``metrics.jsonl`` has at least ``lines`` lines, then SIGKILL one alive actor
    of that class. ``killed`` records ``(lines, class, pid)`` for the test to check."""

    def __init__(self, run_dir: Path, plan: list[tuple[int, str]], timeout_s: float = 900) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.plan, self.timeout_s = run_dir, plan, timeout_s
        self.killed: list[tuple[int, str, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for lines, class_name in self.plan:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if metrics_lines(self.run_dir) >= lines:
                    pids = alive_pids(class_name)
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)
                        self.killed.append((lines, class_name, pids[0]))
                        break
                time.sleep(0.2)

    def join_all(self) -> None:
        self.stop.set()
        self.join(timeout=30)
