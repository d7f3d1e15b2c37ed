"""The package's layers, read from its imports (every import statement, at module level or inside a function).

- adapters, custom/fedmed/flare/: NVFlare types <-> core types; the only package that may import nvflare to run
  a job (cli/ may too, for the admin API and the job scripts).
- entry points, custom/fedmed/cli/: every main; may import anything public.
- store, custom/fedmed/store/: SQL and the journal; maps the core's records (fedmed.job.records) to tables; no nvflare.
- tools of the record: display/report.py, sim/redteam.py, inference/run.py and inference/record.py read or write the record through the
  store's Repository (a report of a run, the red team's recorded run, the inference log). They import no nvflare.
- the core: every other module (job/, models/, server/ with robust/, site/, learning/, security/, privacy/, data/,
  sim/, display/'s console and live metrics, inference/ but its record tools): imports neither nvflare, nor fedmed.store, nor the adapters or entry points.
Nothing anywhere imports nvflare.private: those are NVFlare's internals and change without notice.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom" / "fedmed"
ADAPTERS, ENTRY_POINTS, STORE = "flare", "cli", "store"
# Modules outside store/ that are tools of the record: they may import the store, and nothing else the core may not.
RECORD_TOOLS = ("display/report.py", "sim/redteam.py", "inference/run.py", "inference/record.py")


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


MAX_PARAMETERS = 8  # issue 27: beyond this a call site cannot be read; group settings into a frozen dataclass


def parameters_of(fn: ast.FunctionDef) -> list:
    """The parameters a caller fills in: positional, keyword-only, *args and **kwargs; self and cls not counted."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return [n for n in names if n not in ("self", "cls")]


def long_signatures(path: Path) -> list:
    return [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} takes {len(parameters_of(node))}"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(parameters_of(node)) > MAX_PARAMETERS
    ]


def test_no_function_takes_more_than_eight_parameters():
    too_many = [line for p in sorted(PACKAGE.rglob("*.py")) for line in long_signatures(p)]
    assert too_many == [], "group these settings into a frozen dataclass:\n" + "\n".join(too_many)


def test_the_parameter_count_sees_keyword_only_and_star_parameters(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "class C:\n    def m(self, a, b, c, d, *e, f, g, h, **i):\n        pass\n\n\ndef ok(a, b=1):\n    pass\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert long_signatures(probe) == ["probe.py:2 m takes 9"]


MAX_ADAPTER_CLASS_LINES = 400  # issue 27: an NVFlare adapter small enough to read in one sitting
MAX_RUN_LINES = 60  # the Controller's run() reads like NVFlare's FedAvg.run


def _classes(path: Path):
    return [n for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.ClassDef)]


@pytest.mark.parametrize("module", [m for m in _modules() if _layer(m) == ADAPTERS])
def test_no_adapter_class_exceeds_400_lines(module):
    long = [(c.name, c.end_lineno - c.lineno + 1) for c in _classes(PACKAGE / module)]
    assert [(n, lines) for n, lines in long if lines > MAX_ADAPTER_CLASS_LINES] == []


def test_the_controllers_run_is_at_most_60_lines():
    (controller,) = [c for c in _classes(PACKAGE / "flare" / "controller.py") if c.name == "FedMedController"]
    (run,) = [f for f in controller.body if isinstance(f, ast.FunctionDef) and f.name == "run"]
    assert run.end_lineno - run.lineno + 1 <= MAX_RUN_LINES


def test_no_mixin_classes():
    # A mixin reads its host's private attributes (the cross-site evaluation's read ~20); parts are passed what they
    # need, as NVFlare's own workflows are.
    mixins = [
        f"{m}:{c.name}"
        for m in _modules()
        for c in _classes(PACKAGE / m)
        if "Mixin" in c.name or any("Mixin" in ast.unparse(b) for b in c.bases)
    ]
    assert mixins == []
