"""The README's Python example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["refined"].shape == (4, 512)
    assert namespace["image_emb"].shape == namespace["text_emb"].shape
    assert namespace["loss"].ndim == 0 and namespace["loss"].isfinite()


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert len(bash) == 2, "README must hold exactly two set-up commands"
    assert ci == bash[1].strip()
