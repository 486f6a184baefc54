"""What a user reads: the package ships its license and type marker, the changelog names the
version, and docs and code speak to users (no notes about how the work was done)."""
import re
import subprocess
import tomllib
from pathlib import Path

import moec

ROOT = Path(__file__).resolve().parent.parent


def test_license_typing_marker_changelog_and_version():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and (ROOT / "moec" / "py.typed").exists()
    assert f"## {moec.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_docs_speak_to_users():
    files = subprocess.run(["git", "ls-files", "*.md", "moec/*", "passes/*", "runtime/*", "benchmarks/*",
                            "examples/*", "Makefile", ".ci/*"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    notes = re.compile(r"device tool|this session|\$OUT\b|the issue'?s? targets?|H100 session|10-minute call",
                       re.IGNORECASE)
    found = [f"{f}: {m.group(0)}" for f in files if (ROOT / f).is_file()
             for m in [notes.search((ROOT / f).read_text(errors="ignore"))] if m]
    assert not found, found


def test_benchmark_readme_has_the_cost_models_predictions(monkeypatch, tmp_path):
    """benchmarks/README.md's table of predicted times is what `benchmarks/predict.py` prints now."""
    import sys
    monkeypatch.setenv("MOEC_TUNE_FILE", str(tmp_path / "none.json"))      # the cost model's tiles only
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("predict", None)
    import predict
    text = (ROOT / "benchmarks" / "README.md").read_text()
    shown = text.split("<!-- predict.py table: begin -->\n", 1)[1].split("\n<!-- predict.py table: end -->", 1)[0]
    assert shown.strip() == predict.table(predict.all_rows()).strip(), \
        "benchmarks/README.md's prediction table is stale: paste `python benchmarks/predict.py`'s output"
