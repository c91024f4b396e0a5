"""The docs match the code: the Python API example prints what docs/api.md says it prints."""
import re
import subprocess
import sys
from pathlib import Path

from cli_run import cli_env

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_prints_what_the_page_shows(tmp_path):
    page = (ROOT / "docs" / "api.md").read_text()
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", page, re.S)[:2]
    assert code == (ROOT / "docs" / "api_example.py").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "api_example.py")], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [line.rstrip() for line in r.stdout.splitlines()] == [line.rstrip() for line in shown.splitlines()]
    assert (tmp_path / "out" / "api-example" / "structure.json").is_file()
