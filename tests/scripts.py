"""Helpers for tests of the train_*.py scripts."""
import json
import os
import subprocess
import sys
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


def run_script(name, *args, timeout=300, check=True, env=None):
    """Run a script from the repo root as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    p = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
