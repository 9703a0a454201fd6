"""The layering of issue 13, checked from the source: no import cycles between the
project's modules (function-level imports included), dependencies one way
(service -> enhancer -> bitstream), inside ``service`` no package importing one
above it (cli -> api -> jobs -> ingest -> the shared modules), no torch in
``bitstream``, and ``vqe enhance`` / ``import enhancer`` free of the service's stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bitstream", "enhancer", "service")
LAYER = {"bitstream": 0, "enhancer": 1, "service": 2}
# Inside service: a module may import its own rank or lower. Top-level modules
# (config, errors, logs) are rank 0.
SERVICE_RANK = {"ingest": 1, "jobs": 2, "api": 3, "cli": 4}
SERVICE_STACK = ("fastapi", "starlette", "sqlalchemy", "dramatiq", "redis", "uvicorn")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module that ``import name`` loads (the longest known prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Every project module ``module`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text("utf-8"))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.add(target)
    # "from a.b import c" names module a.b.c when it exists, else the package a.b only.
    return {t for t in out if not any(o != t and o.startswith(t + ".") for o in out)} | {
        t for t in out if t in MODULES and MODULES[t].name != "__init__.py"
    }


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _service_rank(module: str) -> int:
    parts = module.split(".")
    return SERVICE_RANK.get(parts[1], 0) if len(parts) > 1 else 0


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_dependencies_point_one_way():
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            a, b = module.split(".")[0], target.split(".")[0]
            if (
                LAYER[b] > LAYER[a]
                or a == b == "service"
                and _service_rank(target) > _service_rank(module)
            ):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_bitstream_imports_no_torch():
    for module, path in MODULES.items():
        if module.startswith("bitstream"):
            tree = ast.parse(path.read_text("utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                    )
                    assert not any(n.split(".")[0] == "torch" for n in names), module


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"import sys\n{code}\n"
        f"print(__import__('json').dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return [m for m in json.loads(res.stdout.splitlines()[-1]) if m in SERVICE_STACK]


def test_vqe_enhance_and_the_library_load_no_service_stack(tmp_path):
    run = (
        "from service.cli import main\n"
        f"assert main(['enhance', {str(tmp_path / 'missing.mp4')!r}, "
        f"{str(tmp_path / 'o.mp4')!r}, '--stages', '2']) == 2\n"
        "import enhancer.engine\n"
    )
    assert _loaded_after(run) == []
    assert _loaded_after("import enhancer\nenhancer.enhance\nimport enhancer.pipeline") == []
    # The worker renders webhook bodies without the web app.
    assert "fastapi" not in _loaded_after("import service.api.presenters")


def _reach(module: str) -> set[str]:
    """Every project module ``module`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_inference_never_reaches_the_training_kit():
    """enhancer's inference modules (all but enhancer.training) import nothing of training,
    at any depth: calibration and measuring live with training."""
    wrong = {
        module: sorted(t for t in _reach(module) if t.startswith("enhancer.training"))
        for module in GRAPH
        if module.startswith("enhancer") and not module.startswith("enhancer.training")
    }
    assert {m: t for m, t in wrong.items() if t} == {}
