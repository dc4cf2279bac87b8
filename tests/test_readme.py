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
