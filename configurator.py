"""
Plain-Python configuration, nanoGPT-style. A script keeps its settings as module globals with a
comment each, and calls `configure(globals())`; then

    python train.py config/ntp_69m.py --batch_size=8 --compile=False --steer 12783=5

runs the config files in order, then applies the overrides (`--key=value`, `--key value`, or a
bare `--flag` for a boolean). Every value is checked against the type of its default; an unknown
key fails with the list of valid ones; `--help` prints every key, its default and its comment.
A script may also pass the range of each numeric setting, `configure(globals(), ranges=RANGES)`, checked once
every override is in, before the script does any work.

The settings are a script's public, lower-case globals of a plain type; UPPER_CASE names are
constants and never settings.
"""

import ast
import math
import os
import platform
import re
import sys

# The same bits on every x86 machine, set before torch loads, in a process and every one it starts: torch's own CPU
# kernels as on a CPU without AVX-512 (AVX-512 ones round otherwise), and MKL's code path for any x86 CPU. MKL takes
# another path on AMD CPUs whatever else it is told, and under MKL_CBWR=AVX2,STRICT an (emulated) AMD Rome still
# sums some products otherwise than an Intel CPU (docs/reproducibility.md). The price, bench.py --measure=pins:
# on an AVX-512 Intel Xeon 2.7 times a student's step, 3.2 times SmolLM2's labelling.
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def pin_kernels():
    """Sets PINS in this process's environment on an x86 CPU, to be called before torch loads; a user's own
    settings win."""
    if platform.machine() in ("x86_64", "AMD64"):
        os.environ.update({name: value for name, value in PINS.items() if name not in os.environ})


BOOLS = {"true": True, "false": False, "1": True, "0": False}


def config_keys(g):
    """The settings of a script: its public, lower-case globals of a plain type."""
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in g.items() if not k.startswith("_") and k.islower() and isinstance(v, plain)}


def script_settings(path):
    """A script's settings and their defaults, read from its source without running it: every
    assignment before its `configure(globals())`."""
    g = {"__file__": path}
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if "configure(globals()" in ast.unparse(node):
            return config_keys(g)
        if isinstance(node, ast.Assign):
            exec(compile(ast.Module([node], []), path, "exec"), g)
    raise ValueError(f"{path} does not call configure(globals())")


def coerce(key, value, default, from_cli=False):
    """`value` as the type of `default`; a string from the command line is parsed first."""
    if from_cli and not isinstance(default, str):
        if isinstance(default, bool) and value.lower() in BOOLS:
            value = BOOLS[value.lower()]
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                # it stays a string: accepted where the default is None, refused below otherwise
                pass
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise SystemExit(f"error: {key} must be {type(default).__name__} (default {default!r}), got {value!r}")


def check_range(key, settings, spec):
    """Refuses, in one line that names the setting and its range, a value outside `spec`: an interval such as
    '[1, inf)' or '(0, 1]' whose bounds are Python expressions of the settings ('[0, n_layer)'), optionally
    followed by ' if CONDITION', a Python expression of the settings that says when the range applies."""
    text, _, condition = spec.partition(" if ")
    names = {"inf": math.inf, **settings}
    if condition and not eval(condition, {}, names):
        return
    low, high = (eval(bound, {}, names) for bound in text[1:-1].split(","))
    value = settings[key]
    # written so that NaN fails every comparison and is refused
    inside = (low <= value if text[0] == "[" else low < value) and (value <= high if text[-1] == "]" else value < high)
    if not inside:
        # bounds that name other settings are also shown as the numbers they are here
        here = f" (here {text[0]}{low}, {high}{text[-1]})" if set(re.findall(r"[A-Za-z_]\w*", text)) - {"inf"} else ""
        when = f" when {condition}" if condition else ""
        raise SystemExit(f"error: {key} must be in {text}{here}{when}, got {value!r}")


def usage(g, keys, ranges=None):
    """One line per key: name, default, the comment beside its assignment in the script, and its range."""
    comments = {}
    with open(g["__file__"]) as f:
        for line in f:
            m = re.match(r"^\s*(\w+)\s*=.*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    doc = (g.get("__doc__") or "").strip()
    script = os.path.basename(g["__file__"])
    lines = [doc, "", f"usage: python {script} [config.py ...] [--key=value ...]", ""]
    width = max(len(k) for k in keys)
    lines += [f"  --{k:<{width}}  {keys[k]!r:<14} {comments.get(k, '')}"
              + (f"; range {ranges[k]}" if ranges and k in ranges else "") for k in keys]
    return "\n".join(lines)


def configure(g, argv=None, ranges=None):
    """Applies config files and overrides in `argv` (default: sys.argv[1:]) to the globals `g`, checks the
    settings named in `ranges` ({setting: range}, see `check_range`), and returns the settings as a dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = config_keys(g)
    valid = "valid keys: " + ", ".join(sorted(keys))
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(usage(g, keys, ranges))
            raise SystemExit(0)
        if not arg.startswith("--"):
            try:
                with open(arg, encoding="utf-8") as f:
                    source = f.read()
            except UnicodeDecodeError:
                raise SystemExit(f"error: config file {arg} is not UTF-8 text") from None
            # OSError: no such file, a folder, ...; ValueError: a name with a NUL byte
            except (OSError, ValueError) as e:
                raise SystemExit(f"error: cannot read config file {arg!r}: {getattr(e, 'strerror', None) or e}")
            ns = {}
            # a config file is Python, run as it is; what it gets wrong is said in one line
            try:
                exec(compile(source, arg, "exec"), ns)
            except Exception as e:
                raise SystemExit(f"error: config file {arg} fails: {type(e).__name__}: {e}") from None
            for key, value in ns.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in keys:
                    raise SystemExit(f"error: unknown key {key!r} in {arg}; {valid}")
                g[key] = coerce(key, value, keys[key])
            continue
        # partition: values may contain '=' themselves
        key, eq, value = arg[2:].partition("=")
        if key not in keys:
            raise SystemExit(f"error: unknown key {key!r}; {valid}")
        if not eq:
            if isinstance(keys[key], bool) and (i == len(argv) or argv[i].lower() not in BOOLS):
                # a bare --flag
                value = "True"
            elif i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                raise SystemExit(f"error: --{key} needs a value")
        g[key] = coerce(key, value, keys[key], from_cli=True)
    settings = {k: g[k] for k in keys}
    for key, spec in (ranges or {}).items():
        check_range(key, settings, spec)
    return settings


def parse_steer(text, n_concepts):
    """'12783=5,19193=-3' -> {12783: 5.0, 19193: -3.0}: every index in [0, n_concepts), every amount finite."""
    scales = {}
    for item in filter(None, text.split(",")):
        index, eq, scale = item.partition("=")
        try:
            index, scale = int(index), float(scale)
        except ValueError:
            raise ValueError(f"takes CONCEPT=AMOUNT pairs separated by commas, e.g. 12783=5,19193=-3; "
                             f"got {item!r}") from None
        if not eq or not 0 <= index < n_concepts:
            raise ValueError(f"{item!r}: the concept index must be in [0, {n_concepts})")
        if not math.isfinite(scale):
            raise ValueError(f"{item!r}: the amount must be a finite number")
        scales[index] = scale
    return scales
