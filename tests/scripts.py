"""Helpers for tests of the train_*.py scripts."""
import atexit
import io
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def script_functions(name):
    """The pure functions at the top of a train_*.py script: everything above its
    '# default config values' banner, executed without running the script itself."""
    path = ROOT / name
    head = path.read_text().split('\n# default config values')[0]
    ns = {'__name__': path.stem}
    exec(compile(head, str(path), 'exec'), ns)
    return SimpleNamespace(**ns)


# -----------------------------------------------------------------------------
# Running a script: every run is a process of its own, as when a user types `python train_sft.py
# ...` (its own globals, random state, exit code; it can be killed), started from the repository
# root. Most of a tiny run's time would go to `import torch` (2 s), so the process is forked from a
# server that has imported torch and nothing else (multiprocessing's forkserver with torch
# preloaded); the child then sets up what a fresh interpreter would have (argv, sys.path, cwd,
# environment, stdout/stderr, thread count) and runs the script. RLHF_TESTS_SUBPROCESS=1 starts a
# fresh interpreter for every run instead: slower, and the check that the shortcut changes nothing.
FRESH_INTERPRETER = os.environ.get('RLHF_TESTS_SUBPROCESS') == '1'
_forkserver = multiprocessing.get_context('forkserver')
_forkserver.set_forkserver_preload(['torch', 'tiktoken', 'tqdm'])
_BASE_PATH = None  # sys.path of a fresh interpreter, less its first entry (the script's directory)


def _run_forked(argv, cwd, env, out, err, base_path):
    """In the forked child: become `python *argv` run in cwd with env, and run it."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), encoding='utf-8', write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), encoding='utf-8', errors='backslashreplace',
                                  write_through=True)
    import torch  # already imported by the server: its thread pool is not started yet
    if 'OMP_NUM_THREADS' in env:
        torch.set_num_threads(int(env['OMP_NUM_THREADS']))
    code = 0
    try:
        if argv[0] == '-c':  # python -c CODE args...
            sys.argv, sys.path[:] = ['-c', *argv[2:]], ['', *base_path]
            exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
        elif argv[0] == '-m':  # python -m MODULE args...
            sys.argv, sys.path[:] = [argv[1], *argv[2:]], [cwd, *base_path]
            runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
        else:  # python SCRIPT args...
            sys.argv, sys.path[:] = list(argv), [os.path.dirname(os.path.abspath(argv[0])), *base_path]
            runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
        code = e.code
    except BaseException:
        sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught exception
        code = 1
    atexit._run_exitfuncs()
    sys.exit(code)


class _Forked:
    """A forked run, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, process, argv):
        self.process, self.pid, self.args = process, process.pid, argv

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def send_signal(self, sig):
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def start_python(argv, out, err=None, env=None):
    """Start `python *argv` from the repository root, stdout to the file out and stderr to err (or
    out too); env adds to os.environ. Returns a Popen-like object (poll, wait, send_signal, kill)."""
    global _BASE_PATH
    argv, full_env = [str(a) for a in argv], dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    if FRESH_INTERPRETER:
        with open(out, 'ab') as o, open(err or out, 'ab') as e:
            return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=o, stderr=e, env=full_env)
    if _BASE_PATH is None:
        _BASE_PATH = json.loads(subprocess.check_output([sys.executable, '-c', 'import sys, json; print(json.dumps(sys.path[1:]))'],
                                                        env=full_env, cwd=ROOT))
    process = _forkserver.Process(target=_run_forked, args=(argv, str(ROOT), full_env, str(out), str(err or out), _BASE_PATH))
    process.start()
    return _Forked(process, argv)


def finish(proc, out, err, timeout):
    """Wait for a run from start_python; returns its CompletedProcess (stdout and stderr as text)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    read = lambda path: Path(path).read_text(encoding='utf-8', errors='replace')
    return subprocess.CompletedProcess(proc.args, proc.returncode, read(out), read(err))


def run_python(argv, timeout=300, env=None):
    """Run `python *argv` from the repository root to its end; returns the CompletedProcess."""
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, 'stdout'), os.path.join(d, 'stderr')
        return finish(start_python(argv, out, err, env), out, err, timeout)


def run_script(name, *args, timeout=300, check=True, env=None):
    """Run a script from the repo root as a user would; returns the CompletedProcess."""
    p = run_python([ROOT / name, *args], timeout, env)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
