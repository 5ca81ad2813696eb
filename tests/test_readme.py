"""README.md as a user reads it: every `opbench`, `pytest` and `torchrun` command it shows is run, either by
.ci/run (its `readme ...` lines run a command exactly as written) or by a named test of this suite; the
install lines are the ones CI runs; every path it names exists; its Layout names every module."""

import ast
import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_pytest

README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
PROGRAMS = {"opbench", "pytest", "torchrun"}
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
CI_TORCH = "pip install torch==2.13.0"

# README commands no CPU run of CI can make as written (GPU shapes, 8 GPUs, several nodes), each with the
# test that runs what it does on this machine.
RUN_BY_TESTS = {
    "pytest bench/ --model llama-3-8b --workload prefill:b=4,s=4096 --dtype bf16,fp8 --benchmark-json=r.json":
        "tests/test_readme.py::test_gpu_sized_bench_commands_select_their_cases",
    "pytest bench/ --model ./my-model/config.json --workload decode:b=1,s=8192 --backend torch":
        "tests/test_readme.py::test_gpu_sized_bench_commands_select_their_cases",
    "torchrun --nproc-per-node=8 -m pytest collectives/ --benchmark-json=coll.json":
        "tests/test_collectives.py::test_two_rank_run_writes_one_json_with_every_case",
    "pytest collectives/":
        "tests/test_collectives.py::test_without_torchrun_a_world_of_one_says_so",
    "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 --rdzv-id=coll1 "
    "-m pytest collectives/ --benchmark-json=coll.json":
        "tests/test_collectives.py::test_launch_reads_torchruns_environment_or_is_a_world_of_one",
    "srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
    '--rdzv-endpoint="$head:29500" --rdzv-id="$SLURM_JOB_ID" -m pytest collectives/ --benchmark-json=coll.json':
        "tests/test_collectives.py::test_launch_reads_torchruns_environment_or_is_a_world_of_one",
    "opbench compare 0001 0002 --storage .benchmarks/h100-sxm/driver-560":
        "tests/test_compare.py::test_runs_from_pytest_benchmark_storage",
}


# Reading shell text ---------------------------------------------------------------------------------

def shell_lines(text: str) -> list[str]:
    """Lines with their continuations (a trailing backslash) joined and runs of blanks made one."""
    return [" ".join(line.split()) for line in re.sub(r"\\\n", " ", text).splitlines()]


def split_comment(line: str) -> tuple[str, str]:
    match = re.search(r"(?:^|\s)#", line)
    return (line, "") if match is None else (line[:match.start()].strip(), line[match.end():].strip())


def commands_of(line: str) -> list[str]:
    """The commands of one shell line that run opbench, pytest or torchrun, also those a comment shows
    (in backticks, or after a colon)."""
    code, comment = split_comment(line)
    found = [part.strip() for part in re.split(r"&&|\|\||;|\|", code)
             if PROGRAMS & set(part.split())]
    found += [m.strip() for m in re.findall(r"`((?:opbench|pytest|torchrun)\s[^`]*|opbench|pytest)`", comment)]
    found += [m.strip() for m in re.findall(r"(?:^|:\s)((?:opbench|pytest|torchrun)\s[^`]*)$", comment)]
    return found


def readme_blocks(kinds=("sh", "bash", "shell", "console")) -> list[str]:
    return re.findall(r"^```(?:" + "|".join(kinds) + r")\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_commands() -> list[str]:
    seen: dict[str, None] = {}
    for block in readme_blocks():
        for line in shell_lines(block):
            seen.update(dict.fromkeys(commands_of(line)))
    return list(seen)


def ci_commands() -> set[str]:
    """The commands .ci/run runs as the README shows them: its lines `readme COMMAND`."""
    found = set()
    for line in shell_lines(CI.read_text()):
        code, _ = split_comment(line)
        match = re.match(r"readme (.*?)(?: \|\| .*)?$", code)
        if match:
            found.add(match.group(1))
    return found


def test_commands_are_read_from_code_blocks_with_their_continuations_and_comments():
    block = ("opbench estimate r.json --model x \\\n    --tp 8 --json   # the `opbench peaks` of it\n"
             "pip install -e . && pytest bench/ --benchmark-json=results.json\n"
             "# runs by id: opbench compare 0001 0002\n"
             "head=$(scontrol show hostnames \"$X\" | head -n1)\n")
    commands = [c for line in shell_lines(block) for c in commands_of(line)]
    assert commands == ["opbench estimate r.json --model x --tp 8 --json", "opbench peaks",
                        "pytest bench/ --benchmark-json=results.json", "opbench compare 0001 0002"]


def test_every_readme_command_is_run_by_ci_or_by_a_named_test():
    commands = readme_commands()
    assert "pytest bench/ --benchmark-json=results.json" in commands and "pytest tests/" in commands
    ci = ci_commands()
    missing = [c for c in commands if c not in ci and c not in RUN_BY_TESTS]
    assert not missing, ("README commands that neither .ci/run (a `readme ...` line) nor a test of "
                         "RUN_BY_TESTS runs:\n" + "\n".join(missing))
    stale = [c for c in RUN_BY_TESTS if c not in commands]
    assert not stale, "RUN_BY_TESTS names commands the README no longer shows:\n" + "\n".join(stale)


def test_every_command_ci_says_it_runs_as_the_readme_shows_it_is_in_the_readme():
    shown = set(readme_commands()) | {c for block in readme_blocks() for line in shell_lines(block)
                                      for c in re.split(r"\s*&&\s*", split_comment(line)[0])}
    ci = ci_commands()
    assert len(ci) > 10
    assert sorted(ci - shown) == [], "lines `readme ...` of .ci/run that README.md does not show"


@pytest.mark.parametrize("test", sorted(set(RUN_BY_TESTS.values())))
def test_the_named_tests_exist(test):
    path, name = test.split("::")
    tree = ast.parse((ROOT / path).read_text())
    assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, test


def test_ci_installs_as_the_readme_says_but_torch_from_a_local_cpu_build():
    top = shell_lines(readme_blocks()[0])
    assert top[0].startswith("pip install torch " + CPU_INDEX), "the first line installs PyTorch's CPU build"
    assert "pytest bench/" in top[1] and "pytest tests/" in top[2]
    ci = ci_commands()
    installs = [part for block in readme_blocks() for line in shell_lines(block)
                for part in re.split(r"\s*&&\s*", split_comment(line)[0]) if part.startswith("pip install")]
    assert [i for i in installs if CPU_INDEX not in i and i not in ci] == []
    torch_installs = re.findall(r"^\s*(pip install torch\S*)", CI.read_text(), re.M)
    assert torch_installs and set(torch_installs) == {CI_TORCH}, torch_installs
    assert f"`{CI_TORCH}`" in README.read_text()  # the README says what CI runs in place of its first line


def test_gpu_sized_bench_commands_select_their_cases(tmp_path):
    """The bench commands of GPU shapes, collected on this CPU: their options parse, the models resolve
    (a zoo name, a config.json path) and the cases are those of the given model, workload, dtypes and
    backends."""
    config = tmp_path / "config.json"
    config.write_text((ROOT / "tests" / "data" / "configs" / "llama-3-8b.json").read_text())
    ids = {}
    for command, test in RUN_BY_TESTS.items():
        if not test.endswith("::test_gpu_sized_bench_commands_select_their_cases"):
            continue
        args = [a.replace("./my-model/config.json", str(config)).replace("=r.json", f"={tmp_path / 'r.json'}")
                for a in shlex.split(command)[1:]]
        proc = run_pytest(*args, "--collect-only", "-q", timeout=180)
        assert proc.returncode == 0, command + "\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
        ids[command] = {line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line}
    prefill, decode = ids.values()
    # llama-3-8b's qkv projection at 4 x 4096 tokens, in both dtypes asked for
    assert {"test_gemm[16384x6144x4096-bf16-fwd-torch]", "test_gemm[16384x6144x4096-fp8-fwd-torch]"} <= prefill
    assert {i.split("[")[1].split("-")[1] for i in prefill if i.startswith("test_gemm[")} == {"bf16", "fp8"}
    assert "test_rmsnorm[16384x4096-bf16-fwd-compile]" in prefill  # every backend, when none is named
    # one token decoding: its qkv GEMM; of the backends, torch only
    assert any(i.startswith("test_gemm[1x6144x4096-") for i in decode)
    families = ("test_gemm[", "test_rmsnorm[", "test_swiglu[", "test_rotary[")
    assert {i.rsplit("-", 1)[1] for i in decode if i.startswith(families)} == {"torch]"}, decode


# Paths and the Layout ---------------------------------------------------------------------------------

def test_paths_and_functions_the_readme_names_exist():
    text = README.read_text()
    names = set(re.findall(r"`([^`\s]+)`", text))
    paths = {n.rstrip("/") for n in names if re.match(r"(?:opbench|bench|tests|collectives|kernels|\.ci)/", n)}
    assert "opbench/spec/plan.py" in paths
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
    files = {p.name for top in ("opbench", "bench", "collectives", "tests") for p in (ROOT / top).rglob("*.py")}
    assert sorted(n for n in names if re.fullmatch(r"\w+\.py", n) and n not in files) == []
    for dotted in re.findall(r"`(opbench(?:\.\w+)+)\(", text):  # opbench.measure.plugin.run_settings(config)
        module, _, attr = dotted.rpartition(".")
        source = ROOT / (module.replace(".", "/") + ".py")
        assert source.exists(), dotted
        assert re.search(rf"^(?:def|class) {attr}\b|^{attr} =", source.read_text(), re.M), dotted


def layout() -> dict[str, str]:
    """The Layout block: each folder or file (a line that starts a name) with the text it holds."""
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```", README.read_text(), re.S | re.M).group(1)
    entries: dict[str, str] = {}
    parent = ""
    name = None
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)\s+(.*)$", line)
        if match and len(match.group(1)) < 4:  # an entry; a continuation line is indented further
            indent, name, what = match.groups()
            if not indent:
                parent = name
            name = parent + name if indent else name
            entries[name] = what
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def test_the_layout_names_every_folder_and_every_module():
    entries = layout()
    assert {"opbench/", "opbench/spec/", "bench/", "collectives/", "tests/", ".ci/"} <= set(entries)
    package = ROOT / "opbench"
    for folder in [package, *sorted(p for p in package.iterdir() if p.is_dir() and any(p.glob("*.py")))]:
        key = folder.relative_to(ROOT).as_posix() + "/"
        assert key in entries, f"README's Layout has no line for {key}"
        words = set(re.findall(r"\w+", entries[key]))
        unnamed = [m.stem for m in sorted(folder.glob("*.py")) if not m.stem.startswith("__") and m.stem not in words]
        assert not unnamed, f"README's Layout line for {key} does not name {unnamed}"
    for top in ("bench", "collectives", "tests", "opbench"):
        assert (ROOT / top).is_dir() and f"{top}/" in entries
    assert "kernels/" not in entries  # the kernels live inside the package
