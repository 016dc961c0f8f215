"""Packaging: what a non-editable install would ship."""


def test_every_subpackage_is_declared_in_setup():
    """A non-editable install ships only the packages setup.py lists."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    declared = set(re.findall(r'"(acelora(?:\.\w+)*)"', (root / "setup.py").read_text()))
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "acelora").rglob("__init__.py")}
    assert found <= declared, sorted(found - declared)
