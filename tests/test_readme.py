"""The README's first-model snippet runs as printed and learns its toy task."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippet(after: str) -> str:
    text = README.read_text()
    section = text.split(after, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_first_model_snippet_learns_xor(capsys):
    scope = {}
    exec(compile(_snippet("## A first model"), "README.md", "exec"), scope)
    assert scope["accuracy"] >= 0.95, scope["accuracy"]
    assert scope["loss"].item() < 0.2
    assert "accuracy" in capsys.readouterr().out


def test_custom_function_snippet():
    import core

    scope = {"core": core}
    exec(compile(_snippet("## How the engine works"), "README.md", "exec"), scope)
    y = scope["y"]
    y.sum().backward()
    x = y._ctx.inputs[0]
    assert x.grad.tolist() == [6.0]
