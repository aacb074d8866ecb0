"""The package's structure: every module imports on its own (no circular import), no module imports
a higher layer (docs/architecture.md), the module map names every module, and the public API the
README lists imports."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "palette"
MAP = ROOT / "docs" / "architecture.md"

# layer of each top-level module or subpackage of palette (docs/architecture.md)
LAYER = {
    "spec": 0, "_exact1d": 0, "metrics": 0, "_jsonio": 0, "_version": 0, "_checks": 0, "_interrupt": 0,
    "cluster": 1, "metadata": 2, "recipe": 3, "recipe_diff": 3, "palettize": 4, "chunking": 5, "ane": 5,
    "probe": 6, "allocate": 7, "pipeline": 7, "export": 8, "experiments": 8, "testing": 8, "plot": 9, "compare": 9,
    "models": 10, "demo": 11, "cli": 11, "pipeline_cli": 11, "__main__": 11,
}


def modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 else None


def imports_of(module: str) -> set[str]:
    """Every palette module `module` imports, at the top or inside functions."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n and n.split(".")[0] == "palette" and n in ALL}
    return found


ALL = set(modules())


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, with palette's other modules unloaded: no import circle
    (`palette.__main__` runs the command line when imported, so it is left out)."""
    names = sorted(m for m in ALL if not m.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"failed = []\nfor name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'palette' or m.startswith('palette.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as e:\n        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for module in ALL:
        own = layer(module)
        if own is None:
            continue  # the package facade re-exports everything
        for dep in imports_of(module):
            dep_layer = layer(dep)
            if dep_layer is not None and dep_layer > own:
                wrong.append(f"{module} (layer {own}) imports {dep} (layer {dep_layer})")
    assert not wrong, "\n".join(sorted(wrong))


def test_module_map_names_every_module() -> None:
    text = MAP.read_text()
    top = {m.split(".")[1] for m in ALL if m.count(".") >= 1}
    assert top == set(LAYER), f"modules without a layer: {top - set(LAYER)}; layers without a module: {set(LAYER) - top}"
    for name, rank in LAYER.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| {rank} |")), "")
        assert f"`{name}`" in row, f"docs/architecture.md: layer {rank} does not list `{name}`"
    for sub in sorted(m.split(".")[2] for m in ALL if m.startswith("palette.probe.")):
        assert f"`{sub}`" in text, f"docs/architecture.md does not describe palette.probe.{sub}"


def test_public_api_in_the_readme_imports() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(from palette import \(.*?\))\n```", readme, re.S)
    assert block, "README.md has no `from palette import (...)` public API block"
    names = re.findall(r"\b(\w+)\b", block.group(1).split("import", 1)[1])
    assert len(names) >= 20
    import palette

    missing = [n for n in names if not hasattr(palette, n)]
    assert not missing, f"public names the README lists that palette does not have: {missing}"
    proc = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
