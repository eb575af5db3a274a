"""Keep the `dist` marker honest: a test that starts processes without it fails and says so.

``pytest -m "not dist"`` is the quick run; it stays quick only if every test
that starts processes (lookahead_dist.testing.spawn, torchrun) carries the
marker. While a test without it is set up or runs, starting a
multiprocessing process or a torchrun subprocess raises an error naming the test.
Fixtures are covered too (a module-scoped fixture is set up inside its first test).
"""

from __future__ import annotations

import multiprocessing.process
import subprocess

import pytest

_current = {"test": None, "dist": True}  # outside a test's setup and call: allowed
_LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


def _refuse(what: str) -> None:
    if not _current["dist"]:
        raise RuntimeError(
            f"{_current['test']} starts {what} but is not marked dist: add @pytest.mark.dist "
            '(or pytestmark = pytest.mark.dist) so that `pytest -m "not dist"` stays fast'
        )


def _guarded_start(original):
    def start(self, *args, **kwargs):
        _refuse(f"a process ({type(self).__name__})")
        return original(self, *args, **kwargs)

    return start


def _guarded_popen_init(original):
    def __init__(self, args, *rest, **kwargs):
        words = [args] if isinstance(args, (str, bytes)) else list(args)
        text = " ".join(w.decode() if isinstance(w, bytes) else str(w) for w in words)
        if any(launcher in text for launcher in _LAUNCHERS):
            _refuse(f"a process group launcher ({text[:80]})")
        return original(self, args, *rest, **kwargs)

    return __init__


def pytest_configure(config):
    base = multiprocessing.process.BaseProcess
    if not getattr(base.start, "_dist_guard", False):
        base.start = _guarded_start(base.start)
        base.start._dist_guard = True
    if not getattr(subprocess.Popen.__init__, "_dist_guard", False):
        subprocess.Popen.__init__ = _guarded_popen_init(subprocess.Popen.__init__)
        subprocess.Popen.__init__._dist_guard = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _watching(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _watching(item):
        yield


class _watching:
    def __init__(self, item):
        self.item = item

    def __enter__(self):
        _current.update(test=self.item.nodeid, dist=self.item.get_closest_marker("dist") is not None)

    def __exit__(self, *exc):
        _current.update(test=None, dist=True)
        return False
