"""Helpers for tests of the train_*.py scripts."""
import ast
import atexit
import contextlib
import io
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def script_functions(name):
    """The pure functions at the top of a train_*.py script: everything above its
    '# default config values' banner, executed without running the script itself."""
    path = ROOT / name
    head = path.read_text().split('\n# default config values')[0]
    ns = {'__name__': path.stem}
    exec(compile(head, str(path), 'exec'), ns)
    return SimpleNamespace(**ns)


def function_defs(name, *functions, **names):
    """Named top-level functions of a train_*.py script, from below its config banner too (the
    update's helpers), without running the script; names: the globals they read (e.g. temperature)."""
    path = ROOT / name
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in functions]
    ns = {'torch': torch, **names}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), 'exec'), ns)
    return [ns[f] for f in functions]


# -----------------------------------------------------------------------------
# Running a script: every run is a process of its own, as when a user types `python train_sft.py
# ...` (its own globals, random state, exit code; it can be killed), started from the repository
# root. Most of a tiny run's time would go to `import torch` (2 s), so the process is forked from a
# server that has imported torch, tiktoken and tqdm (multiprocessing's forkserver, preloaded); the
# child then sets up what a fresh interpreter would have (argv, sys.path, __main__, cwd, environment,
# stdout/stderr, thread count, a random seed, the exit code of an uncaught exception, the clean-up
# at exit) and runs the script. Environment variables that only take effect when an interpreter or
# torch starts can't be set that way: a run given any other than those in READ_AT_RUN_TIME gets a
# fresh interpreter, and RLHF_TESTS_SUBPROCESS=1 gives every run one (slower; the check that the shortcut
# changes nothing: the suite passes both ways). The server also imports torch._dynamo, which the first
# optimizer a script builds would import (another 1.5 s a run).
FRESH_INTERPRETER = os.environ.get('RLHF_TESTS_SUBPROCESS') == '1'
# offline: a proxy on a closed port refuses every connection, and no host bypasses it
OFFLINE_ENV = {'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': '', 'NO_PROXY': ''}
# environment variables read when they are used (a download, the GPT-2 cache), not when the interpreter starts
READ_AT_RUN_TIME = {'OMP_NUM_THREADS', 'GPT2_CACHE', *OFFLINE_ENV}
_forkserver = multiprocessing.get_context('forkserver')
_forkserver.set_forkserver_preload(['torch', 'torch._dynamo', 'tiktoken', 'tqdm'])
_BASE_PATH = None  # sys.path of a fresh interpreter, less its first entry (the script's directory)


def _run_forked(argv, cwd, env, out, err, base_path, stdin=None):
    """In the forked child: become `python *argv` run in cwd with env (stdin read from the file stdin), and run it."""
    import threading
    multiprocessing.set_start_method(None, force=True)  # the script's multiprocessing: the platform default
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(f, fd)
        os.close(f)
    if stdin is not None:
        f = os.open(stdin, os.O_RDONLY)
        os.dup2(f, 0)
        os.close(f)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, 'r', closefd=False), encoding='utf-8')
    sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), encoding=sys.__stdout__.encoding,
                                  errors=sys.__stdout__.errors, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), encoding=sys.__stderr__.encoding,
                                  errors='backslashreplace', write_through=True)
    import torch  # already imported by the server: its thread pool is not started yet
    torch.seed()  # a fresh interpreter's torch starts from a random seed, not from the server's
    if 'OMP_NUM_THREADS' in env:
        torch.set_num_threads(int(env['OMP_NUM_THREADS']))
    main = types.ModuleType('__main__')  # python SCRIPT and -c run the code in a module named __main__
    main.__builtins__ = __builtins__
    code = 0
    try:
        if argv[0] == '-m':  # python -m MODULE args...
            sys.argv, sys.path[:] = [argv[1], *argv[2:]], [cwd, *base_path]
            runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
        else:  # python -c CODE args..., python SCRIPT args...
            if argv[0] == '-c':
                sys.argv, sys.path[:] = ['-c', *argv[2:]], ['', *base_path]
                source, main.__file__ = argv[1], '<string>'
            else:
                main.__file__ = os.path.abspath(argv[0])
                sys.argv, sys.path[:] = list(argv), [os.path.dirname(main.__file__), *base_path]
                source = Path(main.__file__).read_bytes()
            sys.modules['__main__'] = main
            exec(compile(source, main.__file__, 'exec'), main.__dict__)
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):  # sys.exit('message'): printed, exit status 1
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:
        sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught exception
        code = 'SIGINT' if isinstance(e, KeyboardInterrupt) else 1
    # the interpreter's exit: join the threads, run atexit, let the script's objects go (files flush)
    threading._shutdown()
    atexit._run_exitfuncs()
    main.__dict__.clear()
    if code == 'SIGINT':  # an uncaught KeyboardInterrupt ends a process by SIGINT (exit status -2)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
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


def start_python(argv, out, err=None, env=None, stdin=None):
    """Start `python *argv` from the repository root, stdout to the file out and stderr to err (or
    out too), stdin read from the file stdin if given; env adds to os.environ. Returns a Popen-like
    object (poll, wait, send_signal, kill): a forked child, or a fresh interpreter where the child
    could not be one (see above; a script that does not exist: the interpreter's own error)."""
    global _BASE_PATH
    argv, full_env = [str(a) for a in argv], dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    with open(out, 'ab') as o, open(err or out, 'ab') as e:  # the files exist whatever happens next
        forkable = set(env or {}) <= READ_AT_RUN_TIME and full_env.get('OMP_NUM_THREADS', '1').isdigit()
        if FRESH_INTERPRETER or not forkable or not (argv[0] in ('-c', '-m') or os.path.isfile(ROOT / argv[0])):
            with open(stdin, 'rb') if stdin else contextlib.nullcontext() as i:  # no stdin: the caller's
                return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=i, stdout=o, stderr=e, env=full_env)
    if _BASE_PATH is None:
        _BASE_PATH = json.loads(subprocess.check_output([sys.executable, '-c', 'import sys, json; print(json.dumps(sys.path[1:]))'],
                                                        env=full_env, cwd=ROOT))
    process = _forkserver.Process(target=_run_forked, args=(argv, str(ROOT), full_env, str(out), str(err or out), _BASE_PATH,
                                                                   stdin and str(stdin)))
    caller_main, sys.modules['__main__'] = sys.modules['__main__'], types.ModuleType('__main__')
    try:  # with a bare __main__ here, the child does not first import the caller's (pytest's) main module
        process.start()
    finally:
        sys.modules['__main__'] = caller_main
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


def run_python(argv, timeout=300, env=None, input=None):
    """Run `python *argv` from the repository root to its end, the text input typed in if given;
    returns the CompletedProcess."""
    with tempfile.TemporaryDirectory() as d:
        out, err, stdin = os.path.join(d, 'stdout'), os.path.join(d, 'stderr'), None
        if input is not None:
            stdin = os.path.join(d, 'stdin')
            Path(stdin).write_text(input, encoding='utf-8')
        return finish(start_python(argv, out, err, env, stdin), out, err, timeout)


def run_script(name, *args, timeout=300, check=True, env=None, input=None):
    """Run a script from the repo root as a user would (input: the text typed in); returns the CompletedProcess."""
    p = run_python([ROOT / name, *args], timeout, env, input)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_same_log(a_path, b_path):
    """Two runs' log.jsonl, row for row: the same keys in the same order, the same numbers (to float32 noise).
    Returns the second log."""
    a, b = read_log(a_path), read_log(b_path)
    assert [list(row) for row in a] == [list(row) for row in b]
    for a_row, b_row in zip(a, b):
        assert a_row == pytest.approx(b_row, rel=1e-5, abs=1e-6)
    return b
