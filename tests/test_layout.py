"""README's Layout section matches the tree: every room of the package is named, and no file it names is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "custom" / "fedmed"


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    block = text[start:].split("```")[1]  # the tree, between the section's first pair of fences
    assert "custom/fedmed/" in block, "README's Layout section has no tree of custom/fedmed/"
    return block


def _packages() -> list[str]:
    return sorted(
        p.parent.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("__init__.py")
        if p.parent != PACKAGE and "migrations" not in p.parts
    )


def test_every_package_of_fedmed_is_in_readmes_layout():
    block = _layout()
    missing = [p for p in _packages() if f"{p.split('/')[-1]}/" not in block]
    assert missing == [], f"README's Layout section does not name {missing}"


def test_every_module_at_the_top_of_fedmed_is_in_readmes_layout_or_is_tiny():
    # The rooms hold the code: a module left at the top must be named (or be a few lines of plumbing).
    block = _layout()
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py" and len(p.read_text().splitlines()) > 20]
    assert [n for n in loose if n not in block] == []


def test_every_file_readmes_layout_names_exists():
    names = set(re.findall(r"\b([\w/]+\.py)\b", _layout()))
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    gone = sorted(n for n in names if not any(f == n or f.endswith("/" + n) for f in files))
    assert gone == [], f"README's Layout section names files that are not in the tree: {gone}"
