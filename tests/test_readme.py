"""The README's library example runs as written."""

import re
from pathlib import Path


def test_readme_library_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"## Library\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    root = Path(__file__).parent.parent
    commands = re.findall(r"```bash\n(.*?)\n```", (root / "README.md").read_text(), re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (root / ".ci" / "run").read_text()


def test_readme_command_line_example_runs_offline(tmp_path):
    import subprocess
    import sys

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Command line\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    for line in block.strip().splitlines():
        argv = line.split()
        assert argv[:3] == ["python", "-m", "meansparse_core"]
        result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-500:]
    assert (tmp_path / "digits-sparse.pt").exists() and (tmp_path / "digits-sparse.pt2").exists()
