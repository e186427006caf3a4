"""The layering, read from the source with `ast` (every import, at module level or inside a
function): no import cycle among the project's modules, and core/ stays a library without Ray."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "jobs", "cluster")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules (and the top-level packages of others) that `path` imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from core import storage` imports core.storage; `from core.x import y` imports core.x
            names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            names = names or [node.module]
        else:
            continue
        for name in names:
            found.add(name if name in known else name.split(".")[0])
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {m for m in _imports(path, known) if m in known and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_project_modules():
    graph = _graph()
    assert len(graph) > 40  # the walk found the project
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_core_is_a_library_without_ray_jobs_or_cluster():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("core"):
            bad = _imports(path, set(modules)) & {"ray", *(m for m in modules if not m.startswith("core"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_label_job_layers():
    """jobs/ holds the CLI and the Ray wiring; the label run's state and logic are core's."""
    graph = _graph()
    assert "jobs.label_pipeline" in graph["jobs.label"]
    assert not any(m.startswith("jobs") for m in graph["core.label_run"])
    for core_part in ("core.label_config", "core.label_plan", "core.label_run", "core.labelling", "core.lease"):
        assert core_part in graph, core_part


def test_package_arrows_point_one_way():
    """jobs (entry points) may use cluster (operations) and core (the library); cluster may use
    only core; core uses neither."""
    allowed = {"core": {"core"}, "cluster": {"core", "cluster"}, "jobs": {"core", "cluster", "jobs"}}
    for name, deps in _graph().items():
        package = name.split(".")[0]
        wrong = sorted(d for d in deps if d.split(".")[0] not in allowed[package])
        assert not wrong, f"{name} imports {wrong}"


def test_storage_sits_below_the_decoder():
    """Listing objects must not import PIL or simplejpeg: the extension list lives in core.formats."""
    graph = _graph()
    seen, todo = set(), ["core.storage"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert "core.images" not in seen and "core.formats" in seen
    assert graph["core.formats"] == set()
