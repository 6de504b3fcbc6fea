"""The import structure, over the whole of pretrain/ and finetune/ (imports inside functions count): no cycle;
the library imports no app and no command-line module; weights never reach the trainer, data never the models;
no app imports another's entry module; and outside the task modules and the config schema nothing branches on
the task's name (docs/architecture.md's table says the same)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The apps: command-line entry modules (each a main() and a console script) and the command-line layer.
ENTRY_MODULES = {"pretrain.cli.train", "pretrain.cli.make_shards", "pretrain.cli.release", "pretrain.cli.convert",
                 "pretrain.cli.demo", "pretrain.cli.demo_convert", "finetune.run"}
APPS = ENTRY_MODULES | {"pretrain.cli"}  # the library is pretrain minus pretrain.cli (open_clip's library/app split)


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted([*REPO.glob("pretrain/**/*.py"), *REPO.glob("finetune/**/*.py")]):
        parts = f.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports, anywhere in the file. `from pkg import name` counts as the
    submodule pkg.name where there is one, else as pkg; a module's own ancestors (imported anyway) don't count."""
    mods = modules()
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        tree = ast.parse(f.read_text())
        for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]:
            guard.body = []  # imports for type hints only: never executed
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_imports_inside_functions_and_finds_a_planted_cycle():
    g = import_graph()
    assert "pretrain.tasks" in g["pretrain.weights.export"]  # imported inside export_run
    assert cycles({**g, "pretrain.runs": g["pretrain.runs"] | {"pretrain.training.loop"}})


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_the_library_imports_no_app_and_each_layer_points_down():
    g = import_graph()
    library = {m for m in g if m.startswith("pretrain") and m not in APPS}
    for m in sorted(library):
        assert not g[m] & APPS, f"{m} imports an app or the command-line layer: {g[m] & APPS}"
        assert not any(d.startswith("finetune") for d in g[m]), f"{m}: the library imports an app"
    for m in sorted(g):
        if m.startswith("pretrain.weights"):
            assert not any(d.startswith("pretrain.training") for d in g[m]), f"{m} imports the trainer"
        if m.startswith("pretrain.data"):
            assert not any(d.startswith("pretrain.models") for d in g[m]), f"{m} imports the models"
        if m.startswith(("pretrain.tasks", "pretrain.models", "pretrain.data", "pretrain.runs")):
            assert not any(d.startswith(("pretrain.training", "pretrain.weights")) for d in g[m]), m
    assert g["pretrain.errors"] == set() and g["pretrain.collective"] == set()
    # the schema and its owners' rules (torch-free: see the next test)
    assert g["pretrain.config"] <= {"pretrain.architecture", "pretrain.checks", "pretrain.data.aug_checks",
                                    "pretrain.tasks.checks", "pretrain.training.deepspeed_checks"}
    # backend.py is the seam the backends implement: it imports none of them; only the package imports the loop
    assert not {"pretrain.training.deepspeed_backend", "pretrain.training.accelerate_backend"} & g[
        "pretrain.training.backend"]
    assert {m for m in g if "pretrain.training.loop" in g[m]} <= {"pretrain.training"}


def test_reading_a_config_loads_neither_torch_timm_nor_deepspeed():
    """The sbatch script reads configs (load_config) on the submitting host: the schema and every owner's
    rules it runs (a SimMIM config runs the task's) stay torch-free; the lazily loaded package names resolve."""
    import subprocess
    import sys
    code = ("import sys; from pretrain.config import load_config; import finetune.config; "
            "[load_config(c) for c in ('configs/swin_l_22k.json', 'configs/simmim_swinv2_b_192.json')]; "
            "print([m for m in ('torch', 'timm', 'torchvision', 'deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    from pretrain import config, tasks, training, weights
    assert set(config.TASKS) == set(tasks.TASKS) and training.Trainer.__name__ == "Trainer"
    # what a run of each task exports is what pretrain.weights writes for its model
    assert tasks.Classification.export_layouts == weights.LAYOUTS
    assert tasks.MaskedImageModeling.export_layouts == weights.SIMMIM_LAYOUTS


def test_no_app_imports_another_apps_entry_module_and_each_uses_the_cli_layer():
    g = import_graph()
    for m in sorted(ENTRY_MODULES):
        assert not g[m] & (ENTRY_MODULES - {m}), f"{m} imports an entry module: {g[m] & ENTRY_MODULES}"
        uses = "pretrain.cli" in g[m] or m.startswith("pretrain.cli.")  # pretrain.cli's own: `from .. import cli`
        assert uses and "cli.run(" in modules()[m].read_text(), f"{m} does not run its job through pretrain.cli"


def test_nothing_outside_the_tasks_and_the_schema_branches_on_the_task_name():
    """A comparison of something named `task` with a task's name (`cfg.task == "simmim"`, `task in (...)`)
    is a branch on the objective: it belongs in the task module (pretrain/tasks/)."""
    from pretrain.tasks import TASKS
    names = set(TASKS)

    def mentions_task(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and "task" in n.id or isinstance(n, ast.Attribute) and n.attr == "task"
                   for n in ast.walk(node))

    def names_a_task(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Constant) and n.value in names for n in ast.walk(node))
    found = []
    for m, f in modules().items():
        if m.startswith("pretrain.tasks") or m in ("pretrain.config", "finetune.config") or m in APPS:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(mentions_task(s) for s in sides) and any(names_a_task(s) for s in sides):
                    found.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not found, f"branches on the task's name outside pretrain/tasks: {found}"


def test_every_private_reach_goes_through_compat_and_the_floors_are_the_tested_versions():
    """Private names of torch, DeepSpeed and timm (`torch._foreach_lerp_`, `deepspeed.ops.__compatible_ops__`,
    `timm.data._info`, `NAME_TO_OP`, a DataLoader iterator's `_shutdown_workers`, ...) appear in
    pretrain/compat.py alone, which probes them; pyproject.toml's floors are compat.TESTED."""
    import re
    private = re.compile(r"\b(torch|deepspeed|timm|accelerate)(\.\w+)*\._[a-z]\w*|__compatible_ops__|NAME_TO_OP|_shutdown_workers"
                         r"|_python_dispatch|timm\.data\._info|\._config\.load_universal|_reset_state")
    found = [f"{f.relative_to(REPO)}:{i}" for m, f in modules().items() if m != "pretrain.compat"
             for i, line in enumerate(f.read_text().splitlines(), 1)
             if private.search(line.split("#")[0]) and not line.lstrip().startswith(('"', "'"))]
    assert not found, f"private APIs used outside pretrain/compat.py: {found}"
    from pretrain import compat
    compat.check()  # every probe passes on the tested versions
    floors = dict(re.findall(r'"([a-z]+)(?:\[\w+\])?>=([\d.]+)"', (REPO / "pyproject.toml").read_text()))
    assert {k: floors.get(k) for k in compat.TESTED} == compat.TESTED


def test_the_architecture_docs_table_says_what_each_package_imports():
    """docs/architecture.md's package table: its 'depends on (ours)' column is the import graph, package by
    package (a package's modules together; the small bottom modules by name)."""
    import re
    g = import_graph()

    def unit(m: str) -> str:
        parts = m.split(".")
        if parts[0] == "finetune":
            return "finetune"
        return ".".join(parts[:2]) if len(parts) > 1 else m
    deps: dict[str, set[str]] = {}
    for m, ds in g.items():
        deps.setdefault(unit(m), set()).update(unit(d) for d in ds if unit(d) != unit(m))
    rows = re.findall(r"^\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|$", (REPO / "docs/architecture.md").read_text(), re.M)
    table = {pkg: {w if w == "finetune" else f"pretrain.{w}" for w in re.findall(r"[a-z_]+", col.split("(")[0])}
             for pkg, col in rows if pkg.startswith(("pretrain.", "finetune")) and "`" not in col}
    assert len(table) >= 12, table
    for pkg, said in table.items():
        assert said == deps[pkg], f"docs/architecture.md says {pkg} depends on {sorted(said)}; it imports {sorted(deps[pkg])}"
