"""The two test tiers, chosen from the source (tests/conftest.py applies them to every collected test).

- `integration`: the test, one of its fixtures, or a function they call in tests/ starts a process
  (the deepspeed launcher, torchrun, srun, accelerate, a `python -m mmoe_ds.cli` run, any
  `subprocess`/`multiprocessing`/`os.fork`/`os.system` use, `sys.executable`), it is named in
  `STARTS_PROCESSES_INSIDE` (a library starts the process: DataLoader workers, webdataset pipes), or its
  module is in `SLOW_IN_PROCESS` (minutes of in-process training). `make test-all` (CI) runs them.
- `unit`: everything else; `make test` runs these. While a unit test runs (its fixtures' setup and
  teardown included), `no_processes` makes starting a process raise `ProcessInUnitTier`, and the test
  fails even where the library swallowed that exception: a process the scan cannot see (one started
  inside mmoe_ds or a dependency) is reported, not hidden.

The scan follows names through the test's module and the helper modules beside it
(`from launch_util import deepspeed_launch` leads into launch_util.py), so a new test file lands in
the right tier without being listed anywhere.
"""
from __future__ import annotations

import _posixsubprocess
import ast
import contextlib
import functools
import importlib.util
import multiprocessing.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

# Modules whose whole point is starting processes: any reference to them counts.
PROCESS_MODULES = ("subprocess", "multiprocessing", "torch.multiprocessing", "pty", "concurrent.futures.process")
# Single functions that start (or name the interpreter of) a process.
PROCESS_NAMES = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.popen", "os.posix_spawn", "os.posix_spawnp", "os.spawnl", "os.spawnle",
    "os.spawnlp", "os.spawnlpe", "os.spawnv", "os.spawnve", "os.spawnvp", "os.spawnvpe", "sys.executable",
    "concurrent.futures.ProcessPoolExecutor",
})
# Modules that train for minutes in-process (no process to find): file name -> why.
SLOW_IN_PROCESS = {
    "test_experiments_tiny.py": "trains every experiment cell of E1-E6 in-process (about 3 minutes)",
}
# Tests whose processes start inside a library, out of the scan's sight ("file::test function" -> why). The guard
# finds a missing entry: the unit test fails with ProcessInUnitTier, naming what it started.
_LOADER_WORKERS = "the DataLoader's worker processes (fork)"
_PIPE = "webdataset reads pipe: (and http:, through curl) locations in a shell"
STARTS_PROCESSES_INSIDE = {
    "test_data_corruption.py::test_loader_counts_each_bad_sample_once_per_rank": _LOADER_WORKERS,
    "test_data_corruption.py::test_loader_survives_random_damage_to_many_shards": _LOADER_WORKERS,
    "test_data_corruption.py::test_unreadable_locations_are_counted_with_their_name": _PIPE,
    "test_data_corruption.py::test_every_kind_of_location_gives_the_same_samples": _PIPE,
    "test_data_corruption.py::test_open_shard_hands_over_the_raw_bytes": _PIPE,
    "test_data_corruption.py::test_stopping_early_closes_a_pipe_without_error": _PIPE,
    "test_data_ecosystem.py::test_index_refuses_an_unreadable_shard_unless_allowed": _PIPE,
    "test_data_inplace.py::test_shards_mixing_kinds_are_counted_per_kind_and_streamed_by_kind": _LOADER_WORKERS,
    "test_data_inplace.py::test_a_hash_split_is_stable_wherever_the_shards_are_served_from": _PIPE,
    "test_data_inplace.py::test_http_pipe_and_brace_locations_give_the_same_first_50_batches_as_local_paths": _PIPE,
    "test_data_loader.py::test_fixed_steps_and_length": _LOADER_WORKERS,
    "test_data_loader.py::test_one_pass_over_a_damaged_shard_never_repeats_a_sample": _LOADER_WORKERS,
    "test_data_loader.py::test_one_pass_with_sample_level_slots_ends_short_instead_of_repeating": _LOADER_WORKERS,
    "test_data_loader.py::test_resampled_ranks_stay_disjoint_however_long_they_run": _LOADER_WORKERS,
    "test_data_loader.py::test_resume_yields_exactly_the_uninterrupted_batches": _LOADER_WORKERS,
    "test_data_loader.py::test_two_ranks_by_two_workers_see_disjoint_samples_and_the_same_number_of_batches":
        _LOADER_WORKERS,
    "test_data_scale.py::test_a_resume_in_the_middle_of_a_shard_reproduces_the_next_100_batches": _LOADER_WORKERS,
    "test_data_scale.py::test_each_shard_is_read_by_exactly_one_slot_per_epoch": _LOADER_WORKERS,
    "test_data_scale.py::test_resampled_slots_stay_on_their_own_shards": _LOADER_WORKERS,
    "test_safe_load.py::test_the_refusal_is_the_allow_list": "the eval and exec gadgets, once allowed, run os.system",
    "test_triton_kernels.py::test_kernels_compile_ahead_of_time_for_sm90": "triton compiles with ptxas",
}


class ProcessInUnitTier(RuntimeError):
    """A unit-tier test started a process (see the module docstring)."""


def dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def starts_process(name: str) -> bool:
    """Whether the fully qualified `name` starts a process (or names the interpreter to start one)."""
    return name in PROCESS_NAMES or any(name == m or name.startswith(m + ".") for m in PROCESS_MODULES)


class ModuleScan:
    """One Python file of tests/: its top-level functions and classes, what each references, and its imports."""

    def __init__(self, path: Path):
        tree = ast.parse(path.read_text(), filename=str(path))
        self.aliases: dict[str, str] = {}  # local name -> qualified name, from every import in the file
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        self.defs = {n.name: n for n in tree.body if isinstance(n, kinds)}

    def references(self, name: str) -> set[str]:
        """Qualified names that the definition `name` references (decorators and defaults included)."""
        refs = set()
        nodes = list(walk_code(self.defs[name]))
        inner = {id(node.value) for node in nodes if isinstance(node, ast.Attribute)}  # `a` of `a.b`: take `a.b`
        for node in (n for n in nodes if id(n) not in inner):
            if isinstance(node, (ast.Import, ast.ImportFrom)):  # an import inside the function body
                refs.update(self.aliases.get(a.asname or a.name.split(".")[0], a.name) for a in node.names)
            text = dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
            if text:
                root, _, rest = text.partition(".")
                qualified = self.aliases.get(root, root)
                refs.add(f"{qualified}.{rest}" if rest else qualified)
        return refs


def walk_code(tree: ast.AST) -> Iterator[ast.AST]:
    """`ast.walk` without the annotations (`-> subprocess.CompletedProcess` starts nothing)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skip.add(id(node.returns))
            every = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
            skip.update(id(a.annotation) for a in every if a is not None)
        elif isinstance(node, ast.AnnAssign):
            skip.add(id(node.annotation))
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node) if id(child) not in skip)


@functools.cache
def scan(path: Path) -> ModuleScan:
    return ModuleScan(path)


@functools.cache
def helper_file(module: str, beside: Path) -> Path | None:
    """The file of a helper module the tests import: beside them, or a script folder of the repository that a
    test put on sys.path (bench/); None for the package itself (mmoe_ds: the guard watches it), the standard
    library and installed packages."""
    if (beside / f"{module}.py").exists():
        return beside / f"{module}.py"
    if "." in module:
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None
    repo = beside.parent
    if origin is None or not origin.is_relative_to(repo) or origin.is_relative_to(repo / "mmoe_ds"):
        return None
    return None if any(part.startswith(".") or part == "site-packages" for part in origin.parts) else origin


@functools.cache
def process_path(path: Path, name: str) -> list[str] | None:
    """The chain of definitions from `name` (in the file `path`) to a process start, or None if none.

    Names are followed into the file's own top-level definitions and into the helper modules it imports
    (`helper_file`).

    E.g. `['test_training.py:train', 'launch_util.py:deepspeed_launch', 'launch_util.py:launch', 'sys.executable']`.
    """
    seen: set[tuple[Path, str]] = set()

    def walk(file: Path, fn: str) -> list[str] | None:
        if (file, fn) in seen or fn not in scan(file).defs:
            return None
        seen.add((file, fn))
        here = f"{file.name}:{fn}"
        refs = scan(file).references(fn)
        for ref in sorted(refs):
            if starts_process(ref):
                return [here, ref]
        for ref in sorted(refs):
            module, _, attr = ref.rpartition(".")
            target = (file, ref) if not module else (helper_file(module, file.parent), attr)
            if target[0] is not None and target[0].exists() and target != (file, fn):
                chain = walk(*target)
                if chain:
                    return [here] + chain
        return None

    return walk(Path(path), name)


def why_integration(test_file: Path, test_name: str, fixtures: list[tuple[Path, str]]) -> str | None:
    """Why a test (its function and the fixtures it uses, as (file, function name)) is an integration test."""
    if Path(test_file).name in SLOW_IN_PROCESS:
        return SLOW_IN_PROCESS[Path(test_file).name]
    if f"{Path(test_file).name}::{test_name}" in STARTS_PROCESSES_INSIDE:
        return "starts a process: " + STARTS_PROCESSES_INSIDE[f"{Path(test_file).name}::{test_name}"]
    for file, name in [(Path(test_file), test_name)] + fixtures:
        if Path(file).parent == Path(test_file).parent:  # not pytest's own fixtures (tmp_path, capsys, ...)
            chain = process_path(file, name)
            if chain:
                return "starts a process: " + " -> ".join(chain)
    return None


@contextlib.contextmanager
def no_processes(test: str, violations: list[str]) -> Iterator[None]:
    """Inside: starting a process raises ProcessInUnitTier and appends what was started to `violations`."""

    def refuse(what: str):
        def refused(*args, **kwargs):
            shown = args[0] if what == "subprocess" and args else what
            violations.append(f"{what}: {shown!r}")
            raise ProcessInUnitTier(
                f"{test} is a unit test (tier chosen in tests/tiers.py) but started a process ({what}: {shown!r}); "
                "a unit test must not: start it from a helper the scan can see (subprocess, launch_util, ...), "
                "or name the test in tiers.STARTS_PROCESSES_INSIDE, so that it runs in the integration tier")
        return refused

    patches = [(subprocess.Popen, "_execute_child", lambda self, args, *rest: refuse("subprocess")(args)),
               (_posixsubprocess, "fork_exec", refuse("fork_exec")),
               (multiprocessing.util, "spawnv_passfds", refuse("multiprocessing spawn"))]
    patches += [(os, name, refuse(f"os.{name}")) for name in ("fork", "forkpty", "system", "posix_spawn",
                                                               "posix_spawnp", "spawnv", "spawnve", "spawnvp",
                                                               "spawnvpe") if hasattr(os, name)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
