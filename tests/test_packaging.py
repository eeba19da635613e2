"""One source of truth for dependencies: environment.yml must mirror pyproject.toml, and set-up must stay true."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The GPU environment installs these builds in place of pyproject's (same version range, CUDA providers inside).
GPU_BUILDS = {"onnxruntime>=1.17": "onnxruntime-gpu>=1.17"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment_pip_entries() -> list[str]:
    """The `- pip:` list of environment.yml (a tiny reader: the file is flat YAML we write ourselves)."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    entries = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s{6,}- (.+)$", line)
        if not m:
            break
        entries.append(m.group(1).strip())
    return entries


def test_environment_yml_mirrors_pyproject() -> None:
    project = _pyproject()["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["backend"]
    entries = _environment_pip_entries()
    # torch is pinned to the exact version the set-up installs; everything else must be the same requirement text.
    pinned = [e for e in entries if e.startswith("torch==")]
    assert len(pinned) == 1, "environment.yml must pin torch exactly once"
    others = [e for e in entries if not e.startswith("torch==") and e != "-e ."]
    assert "-e ." in entries, "environment.yml must install the project itself"
    assert sorted(others) == sorted(GPU_BUILDS.get(r, r) for r in wanted if not r.startswith("torch")), (
        "environment.yml pip list differs from pyproject dependencies + backend extra"
    )


def test_setup_pins_the_same_torch_as_environment_yml() -> None:
    setup = (ROOT / "tools" / "setup_envs.sh").read_text()
    pinned = next(e for e in _environment_pip_entries() if e.startswith("torch=="))
    assert pinned in setup
    torch_req = next(r for r in _pyproject()["project"]["optional-dependencies"]["backend"] if r.startswith("torch"))
    version = pinned.split("==")[1]
    assert torch_req.startswith("torch>=") and tuple(map(int, version.split("."))) >= tuple(
        map(int, torch_req.split(">=")[1].split("."))
    )


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```[a-zA-Z]*\n(.*?)```", readme, re.S)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci and "generate" in commands[0]


def test_the_servers_settings_table_is_the_schemas_own() -> None:
    from protocol.settings_cli import markdown_table

    assert markdown_table() in (ROOT / "backend" / "server" / "README.md").read_text()


def test_the_backend_venv_gets_the_cluster_extra_its_tests_need() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    assert [r for r in extras["cluster"] if r.startswith("ray")], "the cluster extra is Ray"
    setup = (ROOT / "tools" / "setup_envs.sh").read_text()
    backend_venv_extras = re.findall(r'pip_quiet \.venv -e "\.\[([a-z,-]+)\]"', setup)
    assert len(backend_venv_extras) == 1 and {"backend", "cluster", "test"} <= set(backend_venv_extras[0].split(","))


def test_the_first_run_commands_in_the_readme_are_real() -> None:
    """Every `./trellis2 backend ...` line of README's First run section parses with the backend's own CLI."""
    import shlex

    from backend.__main__ import build_parser

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## First run", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```[a-z]*\n(.*?)```", section, re.S) for line in block.splitlines()
                if line.startswith("./trellis2 backend ")]
    assert len(commands) >= 2
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[2:])
        assert args.command == "weights" and callable(args.run)
