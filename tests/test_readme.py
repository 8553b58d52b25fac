"""The README documents every environment switch the package and its build read, and every benchmark option."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# read or set by the code but not switches a user sets for us: PATH is extended to find ninja; the benchmark only
# quietens transformers with setdefault
NOT_SWITCHES = {"PATH", "TRANSFORMERS_VERBOSITY"}


def _environment_names() -> set[str]:
    names = set()
    for path in [ROOT / "setup.py", *sorted((ROOT / "vera_kernels").rglob("*.py"))]:
        src = path.read_text()
        consts = dict(re.findall(r"^(ENV_\w+)\s*=\s*\"(\w+)\"", src, flags=re.M))
        # os.environ reads, and backends.env_value (a faster os.environ.get) calls
        reads = re.findall(r"os\.environ(?:\.get|\.setdefault|\.pop)?\s*[\(\[]\s*([\w\"']+)", src)
        reads += re.findall(r"\benv_value\(\s*([\w\"']+)", src)
        for arg in reads:
            if arg == "name" and "def env_value(name" in src:
                continue  # env_value's own fallback: its callers are scanned
            name = consts.get(arg, arg.strip("\"'"))
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"{path.name}: cannot resolve os.environ[{arg}]"
            names.add(name)
    return names - NOT_SWITCHES


def test_every_environment_switch_is_documented():
    names = _environment_names()
    assert {"VERA_KERNELS_BACKEND", "VERA_KERNELS_BASE_GEMM", "TRITON_INTERPRET"} <= names  # the scan finds them
    switches = README[README.index("## Switches"):]
    missing = sorted(n for n in names if f"`{n}" not in switches)
    assert not missing, f"environment variables read by the code but not in the README's Switches section: {missing}"


def test_every_bench_option_is_documented():
    from vera_kernels.bench import build_parser

    opts = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    bench = README[README.index("## Benchmark"):README.index("## Switches")]
    missing = sorted(o for o in opts if f"`{o}" not in bench)
    assert not missing, f"bench options missing from the README's benchmark section: {missing}"
