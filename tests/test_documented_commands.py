"""Every `drex` command the READMEs and `benchmarks/gpu.sh` tell someone to run parses with today's
options (parsed only, not run): a renamed option or a wrong choice in a documented command is found
here, not on a lent GPU's clock."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from drex_hf.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DRIVER = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*/)?(?:drex|python3? -m drex_hf\.cli\.main)\s+(?P<args>.*)$")


def _logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def _documented() -> list[tuple[str, str]]:
    """(where, argument string) of every drex command in the READMEs' code blocks and in gpu.sh."""
    found = []
    for name in ("README.md", "benchmarks/README.md"):
        blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / name).read_text(), re.S)
        for block in blocks:
            for line in _logical_lines(block):
                match = DRIVER.match(line.strip())
                if match:
                    found.append((name, match["args"]))
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    bench = re.search(r"BENCH=\((.*?)\)", script, re.S)
    assert bench is not None, "gpu.sh defines its bench command as BENCH=(...)"
    for line in _logical_lines(script):
        line = line.replace('"${BENCH[@]}"', bench[1].replace("\n", " "))
        match = DRIVER.match(re.sub(r'^step \S+ "\$\{[A-Z_]+:-\d+\}" ', "", line.strip()))
        if match:
            found.append(("benchmarks/gpu.sh", match["args"]))
    return found


COMMANDS = _documented()


def test_the_documents_name_drex_commands():
    where = {name for name, _ in COMMANDS}
    assert where == {"README.md", "benchmarks/README.md", "benchmarks/gpu.sh"}
    assert sum(name == "benchmarks/gpu.sh" for name, _ in COMMANDS) >= 2


@pytest.mark.parametrize("where, args", COMMANDS, ids=[f"{w}:{a[:40]}" for w, a in COMMANDS])
def test_a_documented_command_parses(where, args):
    argv = shlex.split(args, comments=True)
    argv = [a.replace("$WORK", "/tmp/work").replace("$OUT", "/tmp/out") for a in argv]
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `drex {' '.join(argv)}` does not parse (exit {err.code})")


SPEC_BENCHES = [(w, a) for w, a in COMMANDS if a.split()[0] == "bench" and "self_spec" in a]


@pytest.mark.parametrize("where, args", SPEC_BENCHES, ids=[f"{w}:{a[:40]}" for w, a in SPEC_BENCHES])
def test_a_documented_self_spec_bench_passes_the_checks_before_the_model_loads(where, args):
    """Its self_spec spellings, exits and acceptances pass the checks `drex bench` makes before it
    loads a model (exit points come from the synthetic shape or the heads folder's exit_config.json)."""
    from drex_hf.bench.run import check_policies
    from drex_hf.cli.bench import _spec_policies

    argv = [a.replace("$WORK", "/tmp/work").replace("$OUT", "/tmp/out") for a in shlex.split(args, comments=True)]
    parsed = build_parser().parse_args(argv)
    policies = [p.strip() for p in parsed.policies.split(",") if p.strip()]
    check_policies(policies)
    if parsed.model:
        parsed.model = str(ROOT / parsed.model)
    assert any(p.startswith("self_spec@") for p in _spec_policies(parsed, policies)), where
