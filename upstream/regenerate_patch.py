"""Regenerate upstream/transformers.patch after transformers_cp's `context_parallel_*` fields change:

    python upstream/regenerate_patch.py

It copies the installed transformers to a temporary `src/transformers`, commits it to a new git repository, applies
the current patch, writes the field block of `training_args.py` again from `ContextParallelArguments` (names, types,
defaults, help texts, laid out as ruff formats them), and writes `git diff` back to the patch. The rest of the patch
(the docstring section, the two calls, the integration module) is kept as it is. Needs git and patch.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import transformers

from transformers_cp.training_args import ContextParallelArguments

PATCH = Path(__file__).resolve().parent / "transformers.patch"
BEGIN = "    # --- Context Parallelism (transformers_cp) ---\n"
END = "    # --- Debugging ---\n"
LINE_LENGTH = 119


def field_block() -> str:
    lines = [BEGIN]
    for f in dataclasses.fields(ContextParallelArguments):
        default = json.dumps(f.default) if isinstance(f.default, str) else repr(f.default)
        text = json.dumps(f.metadata["help"])
        lines += [f"    {f.name}: {f.type} = field(\n", f"        default={default},\n"]
        one_line = f'        metadata={{"help": {text}}},\n'
        if len(one_line) - 1 <= LINE_LENGTH:
            lines.append(one_line)
        else:
            lines += ["        metadata={\n", f'            "help": {text}\n', "        },\n"]
        lines.append("    )\n")
    return "".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tree:
        source = Path(tree) / "src" / "transformers"
        shutil.copytree(Path(transformers.__file__).parent, source, ignore=shutil.ignore_patterns("__pycache__"))

        def run(*command: str) -> str:
            return subprocess.run(command, cwd=tree, check=True, capture_output=True, text=True).stdout

        run("git", "init", "-q")
        run("git", "add", "-A")
        run("git", "-c", "user.name=upstream", "-c", "user.email=upstream@localhost", "commit", "-qm", "installed")
        run("patch", "-p1", "--batch", "--forward", "-i", str(PATCH))
        arguments = source / "training_args.py"
        text = arguments.read_text()
        start, end = text.index(BEGIN), text.index(END)
        arguments.write_text(text[:start] + field_block() + text[end:])
        run("git", "add", "-N", ".")
        PATCH.write_text(run("git", "diff", "--no-color"))
    print(f"wrote {PATCH} for transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
