"""The recipes of docs/architecture.md, followed from outside the package, and the layout's rules.

The recipe blocks are executed as the page prints them: they register a toy
router, a toy experts kind and a toy compute path (one registration each,
no edit to moekit's files) and a toy dispatcher. The parts then run through
``MoE`` against the formula and the loop reference, and through expert
parallelism on two gloo processes against the single-process layer. The
layout tests check that every import points down the floors of
docs/architecture.md, that no module imports itself back, and file sizes.

Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import ast
import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
from tests.distributed_harness import check_sharded_equals_reference, expect_ok, run_ranks
from tests.helpers import assert_close_dicts, run_path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"


def load_recipes() -> dict:
    """Run the page's recipe blocks in one namespace (registering their parts) and return it."""
    text = PAGE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text[text.index("## Recipes"):], flags=re.S)
    assert len(blocks) == 4, "a recipe per part: router, experts, compute path, dispatcher"
    namespace: dict = {"__name__": "architecture_recipes"}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec", dont_inherit=True), namespace)
    return namespace


@pytest.fixture
def recipes():
    from moekit import COMPUTE_PATHS, EXPERTS, ROUTERS

    saved = dict(ROUTERS), dict(EXPERTS), dict(COMPUTE_PATHS)
    yield load_recipes()
    for registry, before in zip((ROUTERS, EXPERTS, COMPUTE_PATHS), saved, strict=True):
        registry.clear()
        registry.update(before)


def _toy_layer(dtype=torch.float64, **fields):
    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    config = MoEConfig(**{"d_model": 8, "d_ff": 1, "num_experts": 4, "top_k": 2, "router": "tempered_topk",
                          "temperature": 0.5, "expert": "diagonal", "compute": "checkpointed",
                          "z_loss_coef": 1e-2, **fields})
    moe = MoE(config).to(dtype)
    with torch.no_grad():
        moe.experts.shift.normal_()
    return moe


def test_each_part_takes_one_registration(recipes):
    from moekit import COMPUTE_PATHS, EXPERTS, ROUTERS

    assert ROUTERS["tempered_topk"] is recipes["TemperedTopKRouter"]
    assert EXPERTS["diagonal"] is not None and COMPUTE_PATHS["checkpointed"].rows is recipes["checkpointed_rows"]
    # The flat keyword reached the router's own options.
    assert _toy_layer().router.options.temperature == 0.5


def test_toy_parts_compute_the_formula_and_match_the_loop_reference(recipes):
    moe = _toy_layer()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out, grads = run_path(moe, "checkpointed", x)
    ref, ref_grads = run_path(moe, "loop", x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-12, atol=1e-12)
    assert_close_dicts(grads, ref_grads, rtol=1e-12, atol=1e-12)
    # By hand: the top 2 of softmax(logits / 0.5), renormalised; expert e is x·s_e + b_e.
    x_TD = x.reshape(-1, 8)
    probs = (x_TD @ moe.router.weight.T / 0.5).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    s, b = moe.experts.scale, moe.experts.shift
    expected = sum(w[:, k:k + 1] * (x_TD * s[idx[:, k]] + b[idx[:, k]]) for k in range(2))
    torch.testing.assert_close(out.y.reshape(-1, 8), expected, rtol=1e-12, atol=1e-12)
    assert set(out.routing.losses) == {"load_balance", "z_loss"}


def test_toy_dispatcher_sees_every_call(recipes):
    moe = _toy_layer(compute="segment")
    moe.dispatcher = recipes["CountingDispatcher"](4)
    for T in (5, 7):
        moe(torch.randn(T, 8, dtype=torch.float64))
    assert int(moe.dispatcher.rows_E.sum()) == 2 * (5 + 7)


def _expert_parallel_worker(rank, world):
    from moekit.parallel import expert_parallel

    load_recipes()  # this process registers the parts the same way
    reference = _toy_layer()
    sharded = expert_parallel(copy.deepcopy(reference))
    gen = torch.Generator().manual_seed(5)
    x_TD = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    proj_TD = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    rows = slice(0, 6) if rank == 0 else slice(6, 11)
    check_sharded_equals_reference(reference, sharded, x_TD, proj_TD, rows, rank, world,
                                   {"rtol": 1e-12, "atol": 1e-12})
    return type(sharded.experts).__name__, sharded.experts.num_experts


def test_toy_parts_run_under_expert_parallelism_as_in_one_process():
    results = expect_ok(run_ranks(_expert_parallel_worker))
    assert results == [("DiagonalExperts", 2), ("DiagonalExperts", 2)]


# --- the layout ---------------------------------------------------------------------

SRC = ROOT / "src" / "moekit"
# Floors of docs/architecture.md, lowest first: a module imports its own floor's package or lower floors.
FLOORS = [
    {"compute", "data", "classic"},
    {"routing", "experts"},
    {"dispatch", "config"},
    {"layer"},
    {"freezing", "models", "parallel"},
    {"train", "interop"},
    {"analysis", "inference", "finetune"},
    {"apps"},
    {"cli"},
    {"__init__", "__main__"},
]
FLOOR = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def _part(module: str) -> str:
    """The floor entry of a module name: its subpackage, or the top-level file."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every moekit import in the file, relative ones resolved."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names if name.split(".")[0] == "moekit"]
    return found


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def _module_of(target: str, modules: dict) -> str:
    """The module an imported name lives in (``from moekit.x import name`` names module moekit.x)."""
    while target not in modules:
        target = target.rpartition(".")[0]
    return target


def test_every_import_points_down_the_floors():
    upward = []
    modules = _modules()
    for module, path in modules.items():
        here = _part(module)
        for target, _ in _imports(path):
            target = _module_of(target, modules)
            there = _part(target)
            if target == "moekit" or there == here:
                continue
            if FLOOR[there] >= FLOOR[here] and not (FLOOR[there] == FLOOR[here] == 0):
                upward.append(f"{module} imports {target}")
    assert upward == []
    assert set(FLOOR) >= {_part(m) for m in _modules() if m != "moekit"}, "a new part needs a floor"


def test_no_import_cycles_at_module_level():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, top_level in _imports(path):
            target = _module_of(target, modules)
            if top_level and target != name:
                graph[name].add(target)
    # A package's __init__ gathers its modules; a cycle through it alone is how Python packages work.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_files_stay_small_and_forward_reads_as_the_pipeline():
    from moekit import MoE

    long_files = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 450}
    assert set(long_files) <= {"classic/_mixture.py"}, long_files
    forward_lines = len(inspect.getsource(MoE.forward).splitlines())
    assert forward_lines <= 30, forward_lines


def test_the_page_quotes_forward_as_it_is():
    from moekit import MoE

    quoted = re.search(r"```text\n(.*?)```", PAGE.read_text(), flags=re.S).group(1)
    source = [line.strip() for line in inspect.getsource(MoE.forward).splitlines()]
    for line in quoted.strip().splitlines():
        assert line.strip() in source, f"docs/architecture.md quotes a line MoE.forward no longer has: {line!r}"
