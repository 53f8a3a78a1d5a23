"""
nanoGPT's config idiom as a function. A train_*.py script defines its defaults as module
globals, one per line with a trailing comment, and then calls

    from configurator import configure
    config = configure(globals())   # the dict goes into every checkpoint

so that it can be run as

    python train_sft.py config/sft_gpt2_hh.py --batch_size=32 --out_dir=out/x

Each argument is a config file or --key=value, applied in order (later wins). Config files
are Python and are executed: only use config files you trust. Every name a file defines,
except _private names, modules, functions and classes, is an override. Command-line values
are read with ast.literal_eval, or kept as the raw string when that fails (--out_dir=out/x).
Unlike nanoGPT, keys from files are checked as strictly as keys from the command line: an
unknown key or a value of the wrong type is an error, not a silent new global.
--help lists every key with its value in effect (the default, or what the other arguments set;
keys and types are checked, a script's range checks are not) and its comment. Bad input found
later (a UserError: a data file's line, a NaN loss) is also reported as one line.
"""
import ast
import difflib
import math
import os
import re
import sys
import types

TYPES = (int, float, bool, str, type(None))  # what a config value may be
# `key = value  # comment` at module level; a '#' inside a quoted value doesn't start the comment
COMMENT_LINE = re.compile(r"""^(\w+)\s*=(?:'[^']*'|"[^"]*"|[^'"#])*#\s*(.*)$""")


class ConfigError(ValueError):
    pass


class UserError(Exception):
    """Bad input or numbers the user can act on (a data file's line, a NaN loss): a script run from
    the command line prints the message as one line, no traceback, and exits with code 1."""


def report_user_errors(kind, value, tb):
    if isinstance(value, UserError):
        print(f'error: {value}', file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def check(condition, message):
    """Range checks in scripts: check(kl_coef >= 0, 'kl_coef must be >= 0'). A failed check ends
    the script at start-up with the message and exit code 2, no traceback."""
    if not condition:
        print(f'config error: {message}', file=sys.stderr)
        sys.exit(2)


def print_help(keys, path):  # keys: the values in effect (the defaults, then any config files and --key=value)
    comments = {}
    if path and os.path.isfile(path):
        with open(path) as f:
            comments = {m[1]: m[2] for m in map(COMMENT_LINE.match, f) if m}
    script = os.path.basename(path or 'script.py')
    print(f'usage: python {script} [config.py ...] [--key=value ...]')
    defaults = {k: f'{k} = {v!r}' for k, v in keys.items()}
    width = max(map(len, defaults.values()), default=0)
    for k, line in defaults.items():
        print(f'  {line:<{width}}  # {comments[k]}' if k in comments else f'  {line}')
    sys.exit(0)


def validate(key, value, raw, keys, source):
    """The value to use for key, or a ConfigError. raw: the command-line string, None for files."""
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        raise ConfigError(f"unknown config key '{key}' from {source}{hint}; "
                          f"valid keys: {', '.join(keys)}")
    default = keys[key]
    if type(value) is float and not math.isfinite(value) or (  # 1e999 reads as inf
            type(default) is float and type(value) is int and abs(value) > sys.float_info.max):
        raise ConfigError(f"config key '{key}' from {source} must be a finite number, got {raw or value!r}")
    if type(value) is type(default) or (default is None and isinstance(value, TYPES)):
        return value
    if type(default) is float and type(value) is int:  # --learning_rate=1
        return float(value)
    if type(default) is str and raw is not None:  # --out_dir=123 means the string '123'
        return raw
    expected = 'int, float, bool, str or None' if default is None else type(default).__name__
    raise ConfigError(f"wrong type for config key '{key}' from {source}: expected {expected}, "
                      f"got {type(value).__name__} ({value!r})")


def overrides(argv, keys):
    """Yield validated (key, value) pairs from config files and --key=value arguments, in order."""
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"malformed argument '{arg}': expected --key=value")
            try:
                value = ast.literal_eval(raw)
            except Exception:  # anything literal_eval can't read is a plain string
                value = raw
            yield key, validate(key, value, raw, keys, 'command line')
        elif arg.startswith('-'):
            raise ConfigError(f"malformed argument '{arg}': expected a config file or --key=value")
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: '{arg}'")
            if not arg.endswith('.py'):  # a data file or a checkpoint given as an argument; a JSONL file is even valid Python
                raise ConfigError(f"'{arg}' is not a config file (a .py file): a data file or checkpoint is "
                                  f"given with its key, --key={arg} (--help lists the keys)")
            namespace = {'__file__': arg}
            try:
                with open(arg, encoding='utf-8') as f:
                    code = compile(f.read(), arg, 'exec')
            except (SyntaxError, UnicodeDecodeError) as e:
                where = f"{arg}:{e.lineno}" if getattr(e, 'lineno', None) else arg
                raise ConfigError(f"{where}: not a valid Python config file ({e.msg if isinstance(e, SyntaxError) else e})") from None
            exec(code, namespace)
            for key, value in namespace.items():
                if not key.startswith('_') and not isinstance(value, types.ModuleType) \
                        and not callable(value):  # callable: functions and classes
                    yield key, validate(key, value, None, keys, arg)


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the globals g; return all config keys."""
    from_script = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = {k: v for k, v in g.items() if not k.startswith('_') and isinstance(v, TYPES)}
    wants_help = '--help' in argv or '-h' in argv
    try:
        new = dict(overrides([a for a in argv if a not in ('--help', '-h')], keys))  # later wins
    except ConfigError as e:
        if not from_script:
            raise
        print(f'config error: {e}', file=sys.stderr)  # a message, not a traceback
        sys.exit(2)
    if wants_help:  # after the arguments: --help shows what a config file sets, and checks it
        print_help({**keys, **new}, g.get('__file__'))
    if from_script:
        sys.excepthook = report_user_errors
    if os.environ.get('RANK', '0') == '0':  # print on the main process only
        for k, v in new.items():
            print(f'overriding {k} = {v!r}')
    g.update(new)
    return {k: g[k] for k in keys}
