"""The README's code examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index):
    pytest.importorskip("torchvision")
    exec(compile(_python_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
