"""The README's library example runs as written."""

import re
from pathlib import Path


def test_readme_library_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"## Library\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
