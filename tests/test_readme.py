"""The README's Python example runs as written (it trains two PPO steps on the toy world)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    result = namespace["result"]
    assert len(result.scores) == 4 and all(0.0 <= s <= 1.0 for s in result.scores)
    assert (tmp_path / "alignpro-run" / "metrics.jsonl").is_file()
