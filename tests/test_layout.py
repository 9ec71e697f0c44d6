"""The rooms and their arrows (README "Layout"): imports run down only, `cli -> lowvram -> quant ->
hyvideo`; the engine (lowvram/*.py) never imports its sub-packages; setup/ never imports
generation/; nothing but cli/ prints. Read from the source with `ast`, so a new import anywhere is
checked without running it (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# room -> prefixes of modules it must not import
FORBIDDEN = {
    "hyvideo": ("quant", "lowvram", "cli"),
    "quant": ("lowvram", "cli"),
    "lowvram": ("cli", "lowvram.generation", "lowvram.setup"),  # the engine: lowvram/*.py
    "lowvram.setup": ("cli", "lowvram.generation"),
    "lowvram.generation": ("cli",),
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def room_of(module: str) -> str:
    for room in ("lowvram.generation", "lowvram.setup"):
        if module.startswith(room + ".") or module == room:
            return room
    return module.split(".")[0]


def imported(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def product_files() -> list[Path]:
    return sorted(p for room in ("hyvideo", "quant", "lowvram", "cli") for p in (ROOT / room).rglob("*.py"))


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_only(path):
    room = room_of(module_name(path))
    wrong = [name for name in imported(path) for banned in FORBIDDEN.get(room, ())
             if name == banned or name.startswith(banned + ".")]
    assert not wrong, f"{path.relative_to(ROOT)} ({room}) imports {sorted(set(wrong))}"


def test_the_checker_sees_a_wrong_arrow(tmp_path, monkeypatch):
    """A relative import from the engine into generation/ is caught (the rule is not vacuous)."""
    fake = ROOT / "lowvram" / "stages.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from .generation.runner import execute\n")
    assert "lowvram.generation.runner" in imported(fake)


def test_only_cli_prints():
    offenders = [str(p.relative_to(ROOT)) for p in product_files() if not str(p.relative_to(ROOT)).startswith("cli")
                 for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert not offenders, offenders
