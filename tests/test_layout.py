"""The package layout: sub-packages by concern, imports only from layers below, no argparse below the
command line, no import circle, modules under 400 lines (the idea of ../shared/tools/check_structure.py,
plus the layer order)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer and the ones before it, never from a later one.
LAYERS = ("base", "sound", "control", "model", "video", "jobs", "live", "cli")
MAX_LINES = 400


def layer_of(module: str) -> str:
    """``sounddiffusion.video.loop`` -> "video"; modules at the top of the package are the base layer,
    except ``sounddiffusion.cli``, the last one."""
    parts = module.split(".")
    if parts[1:] == ["cli"]:
        return "cli"
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return parts[1]
    return "base"


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of ``root/sounddiffusion`` by dotted name."""
    modules = {}
    for path in sorted((root / "sounddiffusion").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules (``sounddiffusion...``, ``ldm...``) that module ``name`` imports, relative
    imports resolved; ``from package import module`` counts as importing the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def layout_problems(root: Path) -> list[str]:
    """What breaks the layering in the project at ``root``, one line each (empty: none)."""
    modules = package_modules(root)
    problems = []
    for name, path in modules.items():
        lines = path.read_text().count("\n")
        if lines >= MAX_LINES:
            problems.append(f"{name}: {lines} lines (keep modules under {MAX_LINES})")
        imported = imports_of(name, path)
        if "argparse" in imported and name != "sounddiffusion.cli":
            problems.append(f"{name} imports argparse (only sounddiffusion.cli may)")
        mine = LAYERS.index(layer_of(name))
        for target in sorted(t for t in imported if t in modules and t != name):
            theirs = LAYERS.index(layer_of(target))
            if theirs > mine and not modules[target].name == "__init__.py":
                problems.append(f"{name} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]}), a later layer")
    for path in sorted((root / "ldm").rglob("*.py")):
        if any(t.split(".")[0] == "sounddiffusion" for t in imports_of("ldm.x", path)):
            problems.append(f"{path.relative_to(root)} imports sounddiffusion (ldm stands on its own)")
    problems += [f"import circle: {' -> '.join(circle)}" for circle in import_circles(import_graph(root))]
    return problems


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``sounddiffusion`` and ``ldm``, at the top or inside
    functions), packages' ``__init__`` left out: importing a module of a package runs its ``__init__``,
    which is never the circle's cause here."""
    modules = package_modules(root)
    for path in sorted((root / "ldm").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {t for t in imports_of(name, path) if t in modules and t != name
                   and modules[t].name != "__init__.py"}
            for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle ``[a, b, ..., a]`` (``a`` the first by name) per set of modules that import each other
    round, found depth-first; empty when the imports form no circle."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    found: dict[frozenset, list[str]] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                circle = path[path.index(target):]
                first = circle.index(min(circle))  # told from its first module by name, however reached
                circle = circle[first:] + circle[:first]
                found.setdefault(frozenset(circle), circle + [circle[0]])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return list(found.values())


def test_the_layers_hold():
    assert layout_problems(REPO) == []


def test_every_module_belongs_to_a_known_layer():
    for name in package_modules(REPO):
        assert layer_of(name) in LAYERS, name
    sub_packages = {p.name for p in (REPO / "sounddiffusion").iterdir() if (p / "__init__.py").exists()}
    assert sub_packages <= set(LAYERS), sub_packages - set(LAYERS)


def _copy_of_the_package(tmp_path: Path) -> Path:
    subprocess.run(["cp", "-r", str(REPO / "sounddiffusion"), str(REPO / "ldm"), str(tmp_path)], check=True)
    return tmp_path


@pytest.mark.parametrize("module, line", [
    ("sound/audio.py", "from sounddiffusion.video import render"),  # sound -> video: a later layer
    ("control/schedules.py", "from ..model.engine import Engine"),  # relative, control -> model
    ("errors.py", "import sounddiffusion.jobs.cluster"),  # base -> jobs
    ("video/loop.py", "from sounddiffusion.cli import run"),  # anything -> cli
    ("model/engine.py", "import argparse"),
])
def test_a_reverse_import_is_found(tmp_path, module, line):
    root = _copy_of_the_package(tmp_path)
    assert layout_problems(root) == []
    path = root / "sounddiffusion" / module
    path.write_text(line + "\n" + path.read_text())
    problems = layout_problems(root)
    # the reverse import, then any import circle it closes (video.render imports sound.audio back)
    assert problems[0].startswith("sounddiffusion." + module[:-3].replace("/", ".")), problems
    assert all(p.startswith("import circle: ") for p in problems[1:]), problems


@pytest.mark.parametrize("module, line, circle", [
    # two modules of one layer importing each other: the layer order allows each edge
    ("video/frame_chain.py", "from sounddiffusion.video.loop import diffuse",
     "sounddiffusion.video.frame_chain -> sounddiffusion.video.loop -> sounddiffusion.video.frame_chain"),
    # the same inside a function (imported late, still a circle); ldm's own modules count too
    ("model/samplers.py", "def later():\n    from sounddiffusion.model.engine import Engine",
     "sounddiffusion.model.engine -> sounddiffusion.model.samplers -> sounddiffusion.model.engine"),
])
def test_an_import_circle_is_found(tmp_path, module, line, circle):
    root = _copy_of_the_package(tmp_path)
    path = root / "sounddiffusion" / module
    path.write_text(line + "\n" + path.read_text())
    assert layout_problems(root) == [f"import circle: {circle}"]


def test_import_circles_of_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert import_circles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_ldm_importing_the_package_is_found(tmp_path):
    root = _copy_of_the_package(tmp_path)
    path = root / "ldm" / "util.py"
    path.write_text("from sounddiffusion.errors import UserError\n" + path.read_text())
    assert layout_problems(root) == ["ldm/util.py imports sounddiffusion (ldm stands on its own)"]


def test_the_import_lines_of_the_readme_and_docs_run():
    """Every ``from sounddiffusion... import ...`` the README and docs/ show works as written."""
    lines = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines.update(re.findall(r"from sounddiffusion[\w.]* import [\w, ]+(?: as \w+)?", doc.read_text()))
    assert len(lines) >= 3, lines
    done = subprocess.run([sys.executable, "-c", "\n".join(sorted(lines))], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
