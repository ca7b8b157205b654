"""The architecture as tests: stage packages import only downwards, no import cycle, and `lora`
(model-side code) pulls in none of Ray, MLflow or DeepSpeed."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Lowest first. A module may import from its own stage or any stage before it, never after.
STAGES = ["core", "config", "data", "tracking", "artifacts", "plan", "train", "eval", "tune", "ablate", "registry",
          "serve", "cluster", "<top>"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every pipelines.* module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipelines.x import y` names module pipelines.x.y when that is a module.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "pipelines").rglob("*.py")}
    known = set(files)
    return {mod: imported_modules(path, known) - {mod} for mod, path in files.items()}


def stage_of(mod: str) -> int:
    parts = mod.split(".")
    return STAGES.index(parts[1]) if len(parts) >= 2 and parts[1] in STAGES else STAGES.index("<top>")


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_every_pipelines_module_belongs_to_a_stage_package_or_the_top():
    for mod in import_graph():
        path = ROOT / Path(*mod.split("."))
        if path.is_dir():  # a package: pipelines itself, or a stage
            assert mod == "pipelines" or mod.split(".")[1] in STAGES, f"{mod} is not a known stage; add it to STAGES"
        elif len(mod.split(".")) > 2:
            assert mod.split(".")[1] in STAGES, f"{mod}: not in a known stage package; add it to STAGES in order"
        else:
            assert mod.split(".")[-1] in ("cli", "pipeline", "demo"), f"{mod} sits at the top level: give it a stage"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_stage_imports_from_a_stage_above_it():
    upward = [f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in deps
              if stage_of(dep) > stage_of(mod)]
    assert upward == []


def test_importing_lora_loads_no_ray_mlflow_or_deepspeed():
    code = ("import sys, lora, lora.base, lora.adapter, lora.merge, lora.tiny; "
            "print(sorted(m for m in ('ray', 'mlflow', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
