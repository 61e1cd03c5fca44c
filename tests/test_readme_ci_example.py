"""The README's GitHub Actions example ("Gates in CI") is valid YAML, and every llmc command in it
parses with llmc's own command line: each verb exists and takes those options."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer
import yaml

from llmc.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def workflow() -> dict:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Gates in CI"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def llmc_commands(flow: dict) -> list[list[str]]:
    out = []
    for job in flow["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ")
            for line in script.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("llmc "):
                    out.append(shlex.split(line)[1:])
    return out


def parse(args: list[str]):
    """Resolve the (sub)command and parse its options as `llmc` would, without running it."""
    command = typer.main.get_command(app)
    rest, parent = list(args), None
    while hasattr(command, "get_command"):              # a group: `llmc`, `llmc bench`
        name, rest = rest[0], rest[1:]
        parent = command.context_class(command, info_name=name, parent=parent)
        command = command.get_command(parent, name)
        assert command is not None, f"llmc has no verb {name!r} ({' '.join(args)})"
    return command.make_context(command.name, rest, parent=parent)


def test_the_workflow_is_valid_and_runs_the_verbs_it_names():
    flow = workflow()
    steps = flow["jobs"]["gate"]["steps"]
    assert flow.get("on", flow.get(True)) == ["pull_request"] and any("actions/upload-artifact" in s.get("uses", "") for s in steps)
    commands = llmc_commands(flow)
    verbs = [c[0] if c[0] != "bench" else f"bench {c[1]}" for c in commands]
    assert verbs == ["quantize", "bench quality", "bench throughput", "gate", "bench report"]
    for args in commands:
        ctx = parse(args)
        assert ctx.params, args
    gate = parse(next(c for c in commands if c[0] == "gate")).params
    assert gate["profile"] == "int4-gptq" and str(gate["junit"]) == "build/gate.xml"
