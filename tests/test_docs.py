"""Every shell command of README.md and docs/*.md runs as written on CPU, or is listed in SKIPPED with the reason.

The commands are the lines of the ```bash (sh, shell, console) blocks, read as bash reads them: `\\` at a line's end
continues it, `#` starts a comment, other lines are commands of their own; and the inline code spans of the prose that
begin with `pip`, `python`, `torchrun`, `accelerate launch` or `deepspeed` and an argument. Each command that SKIPPED
does not list runs with bash from the root of a fresh copy of the repository (a new `out/`, no earlier results), with
a virtual environment first on PATH that sees this machine's packages (`--system-site-packages`), so that the
documented `pip install` lines run too, into that environment only, and the copy's `src` first on PYTHONPATH (the
checkout under test, whichever Python a launcher starts). A command fails the test when it exits non-zero.

Parts of `a && b` chains that an earlier command already ran successfully (the README and the quickstart repeat the
install and the main job) are not run again. A command that is neither run successfully nor listed fails, and so
does a SKIPPED entry that no document holds any more. Commands run in the order of the documents (README first),
as a reader runs them: a later one may use what an earlier one made (a resume, a plot after its extra's install). Runs every command, so it takes minutes on 2 cores; leave it out
locally with `-m "not slow"` or `--ignore tests/test_docs.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
INLINE_COMMAND = re.compile(r"(?:pip|python|torchrun|accelerate launch|deepspeed)\s+\S")
TIMEOUT = 600.0
pytestmark = pytest.mark.slow

GPU = "needs CUDA GPUs"
# Command (as `Command.key` writes it) -> why the test does not run it.
SKIPPED: dict[str, str] = {
    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q tests': (
        "the test suite itself: CI runs exactly this command (.ci/run)"
    ),
    "pip install flash-attn --no-build-isolation": f"{GPU}: builds flash-attn's CUDA kernels",
    "torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr $MASTER --master-port 29500 "
    "examples/train.py --output_dir out --bf16 --context_parallel_size 8 --fsdp --fsdp_config '{\"version\": 2}'": (
        f"{GPU}: two nodes of 8"
    ),
    "accelerate launch --multi_gpu --num_machines 2 --machine_rank $NODE_RANK --num_processes 16 --main_process_ip "
    "$MASTER --main_process_port 29500 examples/train.py --output_dir out --bf16 --context_parallel_size 8": (
        f"{GPU}: two nodes of 8"
    ),
    "deepspeed --hostfile hostfile --master_addr $MASTER --master_port 29500 examples/train.py --output_dir out --bf16 "
    "--context_parallel_size 8 --deepspeed examples/ds_zero3_offload.json": f"{GPU}: two nodes of 8, a hostfile",
    "python benchmarks/model_sweep.py --out benchmarks/results/model_sweep_cpu.jsonl": (
        "the full model sweep: every causal-LM family in two modes, 11 min on 2 cores; its results are committed"
    ),
    "torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 2": (
        "not a command: the prose describes the two launches of tests/test_engines.py's two-node test"
    ),
    "torchrun --nproc_per_node 2 benchmarks/train.py --shape 7b --seqs 524288 --steps 1 --modes zigzag --fsdp "
    "--offload": f"{GPU}: a 7B model on 524,288-token rows",
    "torchrun --nproc_per_node 2 benchmarks/train.py --shape 1.5b --seqs 32768,65536,131072 --modes "
    "zigzag,ulysses,odysseus --steps 4 --comm": f"{GPU}: a 1.5B model on rows up to 131,072 tokens",
}


@dataclass(frozen=True)
class Command:
    key: str  # the command on one line: continuations joined, comments dropped, spaces collapsed
    file: str  # relative to the repository
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def parts(self) -> list[str]:
        """The commands of an `a && b` chain, run one after the other while they succeed."""
        return [part.strip() for part in re.split(r"\s&&\s", self.key)]


def _drop_comment(line: str) -> str:
    """`line` up to a `#` that starts a bash comment (at the start or after a blank, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _block_commands(block: str, name: str, first_line: int) -> list[Command]:
    commands, pending, start = [], [], 0
    for number, line in enumerate(block.splitlines(), first_line):
        code = _drop_comment(line).rstrip()
        if not code and not pending:
            continue
        start = start or number
        # `\` continues a line only as its last character: before a comment it escapes a blank, as bash reads it
        if code.endswith("\\") and code == line.rstrip():
            pending.append(code[:-1])
            continue
        commands.append(Command(" ".join(" ".join([*pending, code]).split()), name, start))
        pending, start = [], 0
    return commands


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCUMENTS:
        text, name = path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()
        prose = text
        for fence in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S):
            first_line = text.count("\n", 0, fence.start(2)) + 1
            if fence.group(1) in SHELL_BLOCKS:
                commands += _block_commands(fence.group(2), name, first_line)
            blank = re.sub(r"[^\n]", " ", fence.group(0))  # keeps the line numbers of the prose
            prose = prose[: fence.start()] + blank + prose[fence.end() :]
        for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
            if INLINE_COMMAND.match(span.group(1)):
                line = prose.count("\n", 0, span.start()) + 1
                commands.append(Command(" ".join(span.group(1).split()), name, line))
    return sorted(commands, key=lambda command: (DOCUMENTS.index(ROOT / command.file), command.line))


COMMANDS = documented_commands()
_passed: set[str] = set()  # parts that ran successfully in this session


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the repository and the environment the commands run in."""
    base = tmp_path_factory.mktemp("docs")
    root = base / "repo"
    ignore = shutil.ignore_patterns(".git", "out", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")
    shutil.copytree(ROOT, root, ignore=ignore)
    environment = base / "venv"
    venv.create(environment, system_site_packages=True, with_pip=True)
    python_path = [str(root / "src"), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(environment / "bin"), os.environ["PATH"]]),
        "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
        "VIRTUAL_ENV": str(environment),
    }
    return root, env


def test_blocks_are_read_as_bash_reads_them():
    """A comment after `\\` ends the command there (the `\\` escapes a blank), so the lines after it are commands of
    their own: how the quickstart once broke."""
    block = (
        "# a comment line\n"
        "pip install -e .   # trailing comment\n"
        "\n"
        "torchrun a.py --x 1 \\\n"
        "    --y '#not a comment' \\   # a comment after the backslash\n"
        "    --z 3\n"
    )
    assert [(c.key, c.line) for c in _block_commands(block, "doc.md", 10)] == [
        ("pip install -e .", 11),
        ("torchrun a.py --x 1 --y '#not a comment' \\", 13),
        ("--z 3", 15),
    ]


def test_skipped_commands_are_documented():
    stale = sorted(set(SKIPPED) - {command.key for command in COMMANDS})
    assert not stale, f"SKIPPED lists commands that no document holds any more: {stale}"


@pytest.mark.parametrize("command", COMMANDS, ids=[command.where for command in COMMANDS])
def test_documented_command(command: Command, machine):
    if command.key in SKIPPED:
        pytest.skip(SKIPPED[command.key])
    root, env = machine
    for part in command.parts:
        if part in _passed:
            continue
        job = subprocess.run(["bash", "-c", part], cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        output = (job.stdout + job.stderr)[-3000:]
        assert job.returncode == 0, f"{command.where}: `{part}` exited with {job.returncode}:\n{output}"
        _passed.add(part)


if __name__ == "__main__":  # list what the test would run and skip
    for command in COMMANDS:
        print(f"{command.where:28} {'skip' if command.key in SKIPPED else 'run '} {command.key}")
    sys.exit(0)
