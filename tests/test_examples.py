"""The examples are runnable documentation: each must run to completion (they assert against eager)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    """Each example runs, and leaves nothing behind: not in the working directory (but the dump it was
    asked for), not in the temporary directory."""
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(scratch))
    args = [sys.executable, str(path)] + (["--dump", str(work / "dump")] if path.stem == "quickstart" else [])
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in work.iterdir()} <= {"dump"}, sorted(work.iterdir())
    left = [p for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]   # PyTorch's own cache
    assert not left, left
