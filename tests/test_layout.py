"""The house rules the notebooks promise: one module per job in reading order, no module importing one above it,
no module over ~600 lines, no unused import, and library text about ILLUME and the library only."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "illume_ref"
# reading order, floor by floor (DESIGN.md): a module imports only modules before it
ORDER = ["core", "configbase", "config", "toyworld", "oracle", "captions", "tasks",
         "training", "quantizer", "encoders", "toy_encoder", "feature_distance",
         "tokenizer", "reconstruction", "decoder", "vocab", "conversation",
         "model", "sampling", "generate", "generation_bench", "data", "stages",
         "evaluate", "benchmarks", "report", "demo", "cli"]
MODULES = sorted(p.stem for p in LIB.glob("*.py") if not p.stem.startswith("_"))


def imported_modules(name: str) -> set[str]:
    "The illume_ref modules `name` imports, at module level or inside functions."
    tree = ast.parse((LIB / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: found.add(mod.split(".")[0] if mod else "")
            elif mod.startswith("illume_ref."): found.add(mod.split(".")[1])
            elif mod == "illume_ref": found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("illume_ref."))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("illume_ref."):
                found.add(str(arg.value).split(".")[1])
    return found - {"", "__version__"}


def test_every_module_has_a_place_in_the_reading_order():
    assert sorted(ORDER) == MODULES, set(ORDER) ^ set(MODULES)


@pytest.mark.parametrize("name", ORDER)
def test_no_module_imports_one_above_it(name):
    above = [m for m in imported_modules(name) if m in ORDER and ORDER.index(m) > ORDER.index(name)]
    assert not above, f"{name} imports {above}, which come after it"


@pytest.mark.parametrize("name", MODULES)
def test_no_module_is_over_600_lines(name):
    n = len((LIB / f"{name}.py").read_text().splitlines())
    assert n <= 600, f"illume_ref/{name}.py has {n} lines"


def test_no_unused_imports():
    r = subprocess.run([sys.executable, "-m", "pyflakes", *[str(LIB / f"{m}.py") for m in MODULES]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_library_text_speaks_of_illume_only():
    words = re.compile(r"\b(session [0-9]+|this session|the lead|the brief|a helper|lent H200)\b", re.I)
    roots = [LIB, LIB.parent / "nbs", LIB.parent / "tutorials"]
    hits = [f"{p.name}: {m.group()}" for root in roots for p in root.glob("*.[pi]*")
            if p.suffix in (".py", ".ipynb") for m in words.finditer(p.read_text(encoding="utf-8"))]
    assert not hits, hits


# an import inside a function is kept only where a lighter import or an optional package needs it
LAZY_PACKAGES = {"matplotlib.pyplot", "datasets", "openpyxl"}      # plotting / datasets: heavy; openpyxl: optional
TORCH_FREE = {"configbase", "toyworld", "oracle", "captions", "tasks"}   # they reach torch (and core) only on use


def function_level_imports(name: str) -> list[tuple[int, str]]:
    "(line, imported module) of every import inside a function of `name`."
    tree = ast.parse((LIB / f"{name}.py").read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)): continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import): found += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom): found.append((node.lineno, ("." * node.level) + (node.module or "")))
    return found


@pytest.mark.parametrize("name", [m for m in ORDER if m != "cli"])      # the CLI imports each command's modules lazily
def test_imports_inside_functions_have_a_reason(name):
    allowed = LAZY_PACKAGES | ({"torch", "illume_ref.core"} if name in TORCH_FREE else set())
    bad = [(line, mod) for line, mod in function_level_imports(name) if mod not in allowed]
    assert not bad, f"illume_ref/{name}.py imports inside functions without a reason: {bad} (move them to the top)"
