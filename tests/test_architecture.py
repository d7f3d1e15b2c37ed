"""The package's layers, read from its imports (every import statement, at module level or inside a function).

- adapters, custom/fedmed/flare/: NVFlare types <-> core types; the only package that may import nvflare to run
  a job (cli/ may too, for the admin API and the job scripts).
- entry points, custom/fedmed/cli/: every main; may import anything public.
- store, custom/fedmed/store/: SQL and the journal; maps the core's records (fedmed.records) to tables; no nvflare.
- tools of the record: report.py, redteam.py, inference/run.py and inference/record.py read or write the record through the
  store's Repository (a report of a run, the red team's recorded run, the inference log). They import no nvflare.
- the core: every other module (data/, privacy/, crypto/, robust/, the round engine, the site round, records,
  training, model, ...): imports neither nvflare, nor fedmed.store, nor the adapters or entry points.
Nothing anywhere imports nvflare.private: those are NVFlare's internals and change without notice.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom" / "fedmed"
ADAPTERS, ENTRY_POINTS, STORE = "flare", "cli", "store"
# Modules outside store/ that are tools of the record: they may import the store, and nothing else the core may not.
RECORD_TOOLS = ("report.py", "redteam.py", "inference/run.py", "inference/record.py")


def _modules():
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def imports_of(path: Path) -> set:
    """Every module name an import statement in the file names (relative imports resolved against fedmed)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                package = path.relative_to(PACKAGE.parent).parent.parts  # e.g. ("fedmed", "flare")
                base = ".".join(package[: len(package) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from nvflare import private`
    return names


def _layer(module: str) -> str:
    top = module.split("/")[0]
    if top in (ADAPTERS, ENTRY_POINTS, STORE):
        return top
    return "record_tool" if module in RECORD_TOOLS else "core"


def _named(names, *prefixes):
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("module", _modules())
def test_nothing_imports_nvflares_private_internals(module):
    assert _named(imports_of(PACKAGE / module), "nvflare.private") == []


@pytest.mark.parametrize("module", [m for m in _modules() if _layer(m) == "core"])
def test_the_core_imports_neither_nvflare_nor_the_store_nor_the_adapters(module):
    forbidden = _named(imports_of(PACKAGE / module), "nvflare", "fedmed.store", "fedmed.flare", "fedmed.cli")
    assert forbidden == [], f"{module} is core and imports {forbidden}"


@pytest.mark.parametrize("module", [m for m in _modules() if _layer(m) in ("store", "record_tool")])
def test_the_store_and_the_record_tools_import_no_nvflare_nor_the_adapters(module):
    forbidden = _named(imports_of(PACKAGE / module), "nvflare", "fedmed.flare", "fedmed.cli")
    assert forbidden == [], f"{module} imports {forbidden}"


@pytest.mark.parametrize("module", RECORD_TOOLS)
def test_each_record_tool_still_needs_its_exemption(module):
    # A tool that stops using the store is core again: drop it from RECORD_TOOLS so the core rule covers it.
    assert _named(imports_of(PACKAGE / module), "fedmed.store"), f"{module} no longer imports the store"


def test_the_walk_sees_imports_inside_functions_and_from_imports_of_submodules(tmp_path, monkeypatch):
    """The checker itself: a lazy import in a function, `from nvflare import private` and a relative import of the
    store are all seen."""
    pkg = tmp_path / "fedmed"
    pkg.mkdir()
    probe = pkg / "probe.py"
    probe.write_text(
        "from .store import journal\n\n\ndef f():\n    from nvflare import private\n    import fedmed.store.repository\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    names = imports_of(probe)
    assert _named(names, "nvflare.private") == ["nvflare.private"]
    assert _named(names, "fedmed.store") == ["fedmed.store", "fedmed.store.journal", "fedmed.store.repository"]
