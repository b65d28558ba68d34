"""The process protocol of the side-by-side benchmarks (``methods.py``, ``transformer_scale.py``).

Each contender runs in a fresh process of its own (its own peak memory, nothing cached
between contenders) and answers one JSON line per command line on stdin (:func:`serve`);
the parent drives it with :class:`Worker` and sums the resident sets of itself and its
children with :class:`RssSampler`. Every reply carries the process's ``VmRSS``/``VmHWM``.

Commands: ``setup`` (``target``: the explained class; the reply says the one chosen),
``reset`` (``VmHWM`` back to the current resident set: the calls' own peak from here on),
``run`` (one timed call, its result kept), ``save`` (``path``: the kept results, as the
benchmark's ``save`` writes them), ``exit`` (the final peak).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def status() -> dict:
    """``VmRSS`` and ``VmHWM`` of this process, bytes."""
    with open('/proc/self/status') as handle:
        lines = handle.read().splitlines()
    return {k: int(next(line.split()[1] for line in lines if line.startswith(k + ':'))) * 1024
            for k in ('VmRSS', 'VmHWM')}


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current resident set (Linux: ``5 > clear_refs``)."""
    try:
        with open('/proc/self/clear_refs', 'w') as handle:
            handle.write('5')
        return True
    except OSError:
        return False


def _described(error: BaseException) -> str:
    return f'{type(error).__name__}: {str(error)[:600]}'


def serve(make, save, keep: int = 1) -> int:
    """The worker's side: ``make()`` builds the contender and returns ``(setup, call)`` (a
    failure goes into the first line instead); ``save(results, path)`` writes the last
    ``keep`` results of ``call()``."""
    proto = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)     # anything the libraries print goes to stderr, not into the protocol
    start = time.perf_counter()
    results: list = []
    try:
        setup, call = make()
        ready = {'load_s': time.perf_counter() - start, 'modules_torch': 'torch' in sys.modules}
    except Exception as error:     # noqa: BLE001
        setup = call = None
        ready = {'error': _described(error)}
    proto.write(json.dumps({**ready, **status()}) + '\n')
    for line in sys.stdin:
        command = json.loads(line)
        reply = {}
        try:
            if command['cmd'] == 'setup':
                reply['target'] = setup(command.get('target'))
            elif command['cmd'] == 'reset':
                reply['reset'] = reset_peak()
            elif command['cmd'] == 'run':
                begin = time.perf_counter()
                result = call()
                reply['s'] = time.perf_counter() - begin
                results = (results + [result])[-keep:]
            elif command['cmd'] == 'save':
                save(results, command['path'])
            elif command['cmd'] == 'exit':
                proto.write(json.dumps(status()) + '\n')
                return 0
        except Exception as error:     # noqa: BLE001
            reply['error'] = _described(error)
        proto.write(json.dumps({**reply, **status()}) + '\n')
    return 0


class Worker:
    """A contender's process, as the parent sees it: ``argv`` after the interpreter, ``log``
    its stderr (named ``log_name`` in errors)."""

    def __init__(self, label: str, argv: list[str], log, log_name: str, threads: int, python: str = sys.executable,
                 cwd: str | None = None, close_timeout: float = 120):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM='false', PYTHONWARNINGS='ignore', TRANSFORMERS_VERBOSITY='error')
        self.contender, self.log_name, self.close_timeout = label, log_name, close_timeout
        self.process = subprocess.Popen([python, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        text=True, cwd=cwd, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f'the {self.contender} worker ended (exit status {self.process.wait()}); see '
                               f'{self.log_name}')
        return json.loads(line)

    def ask(self, cmd: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({'cmd': cmd, **fields}) + '\n')
        self.process.stdin.flush()
        reply = self._read()
        if 'error' in reply:
            raise RuntimeError(f'{self.contender}: {reply["error"]}')
        return reply

    def close(self) -> dict:
        try:
            reply = self.ask('exit')
        finally:
            self.process.stdin.close()
            self.process.wait(timeout=self.close_timeout)
        return reply

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


class RssSampler:
    """The resident sets of this process and of every live child, summed, every ``period`` seconds."""

    def __init__(self, period: float = 0.2):
        self.period, self.pids, self.peak = period, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid) -> int:
        try:
            with open(f'/proc/{pid}/status') as handle:
                return int(next(line.split()[1] for line in handle if line.startswith('VmRSS:'))) * 1024
        except (OSError, StopIteration):
            return 0

    def _loop(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._rss('self') + sum(self._rss(pid) for pid in list(self.pids)))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak
