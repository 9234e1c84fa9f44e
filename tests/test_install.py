"""Installing attnc beside a user's PyTorch (issue 19): dependencies that tell the truth, Triton imported
only to run kernels, the wheel (with its examples and `py.typed`) installed with `--no-deps` into a fresh
virtual environment that has the project's torch, `attnc --version`, and the public names.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attnc
import attnc.examples
from attnc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's `Requires-Dist` lines: what pip installs with it."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist")


# ---- the dependencies, as the wheel declares them -------------------------------------------------------


def test_torch_is_required_from_the_first_release_that_ships_triton_3_6(installed: Installed) -> None:
    assert "torch>=2.10" in wheel_requirements(installed.wheel)


def test_triton_is_a_linux_only_dependency(installed: Installed) -> None:
    assert 'triton<3.10,>=3.6; sys_platform == "linux"' in wheel_requirements(installed.wheel)


def test_no_dependency_goes_unused(installed: Installed) -> None:
    required = [r for r in wheel_requirements(installed.wheel) if "extra ==" not in r]
    assert [re.split(r"[<>=;]", r)[0] for r in required] == ["torch", "triton", "lark", "jinja2"]


def test_the_plot_and_fuzz_extras_exist(installed: Installed) -> None:
    requirements = wheel_requirements(installed.wheel)
    assert {'matplotlib>=3.8; extra == "plot"', 'numpy>=1.26; extra == "plot"'} <= set(requirements)
    assert 'hypothesis>=6.100; extra == "fuzz"' in requirements


# ---- without Triton -----------------------------------------------------------------------------------

# Runs in a process where `import triton` fails, as on macOS or Windows: everything but a kernel works,
# and the first kernel call says what to install. Prints one JSON object of what it saw.
WITHOUT_TRITON = r"""
import io, json, sys
from contextlib import redirect_stdout
sys.modules["triton"] = None  # `import triton` raises ImportError
import torch
import attnc
from attnc.cli import main

seen = {}
kern = attnc.load("examples/document_causal.attn").document_causal()
q = torch.randn(1, 1, 40, 16)
doc = torch.tensor([[0] * 25 + [1] * 15], dtype=torch.int32)
seen["reference"] = list(kern.reference(q, q, q, doc=doc).shape)
seen["mask"] = int(kern.mask(40, 40, doc=doc).sum())
seen["plan"] = kern.plan(40, 40, doc=doc, block=(16, 16)).sparsity
seen["block_map"] = kern.block_map(40, 40, block=(16, 16), doc=doc).flatten().tolist()
for argv in (["check", "examples/streaming_llm.attn"], ["ir", "examples/streaming_llm.attn"],
             ["show", "examples/streaming_llm.attn", "-p", "streaming_llm", "--q-len", "64"]):
    with redirect_stdout(io.StringIO()):
        seen[argv[0]] = main(argv)
try:
    kern(q, q, q, doc=doc)
except attnc.TritonMissingError as error:
    seen["call"] = [str(error), isinstance(error, ImportError)]
seen["triton imported"] = sys.modules["triton"] is not None
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def without_triton() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_oracle_masks_plans_and_block_maps_work_without_triton(without_triton: dict[str, object]) -> None:
    assert without_triton["reference"] == [1, 1, 40, 16]
    assert without_triton["mask"] == 25 * 26 // 2 + 15 * 16 // 2  # causal within two documents
    assert without_triton["plan"] == "metadata[b]"
    assert without_triton["block_map"] == [1, 0, 0, 1, 1, 0, 0, 1, 1]


def test_check_ir_and_show_work_without_triton(without_triton: dict[str, object]) -> None:
    assert (without_triton["check"], without_triton["ir"], without_triton["show"]) == (0, 0, 0)


def test_the_first_kernel_call_without_triton_says_to_install_it(without_triton: dict[str, object]) -> None:
    message, is_import_error = without_triton["call"]  # type: ignore[misc]
    assert message.startswith("attnc: error: running a kernel needs Triton")
    assert "pip install 'triton>=3.6,<3.10'" in message and "\n" not in message
    assert is_import_error
    assert without_triton["triton imported"] is False


def test_attnc_run_without_triton_is_a_one_line_error() -> None:
    script = (
        "import sys; sys.modules['triton'] = None; from attnc.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "run", "examples/streaming_llm.attn", "-p", "streaming_llm"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert (
        done.stderr.startswith("attnc: error: running a kernel needs Triton")
        and "Traceback" not in done.stderr
    )


# ---- the wheel ----------------------------------------------------------------------------------------


def build_wheel(out: Path) -> Path:
    """attnc's wheel, built without build isolation (no index) from a copy of the sources, so that the
    build leaves nothing in the checkout."""
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # attnc/examples links to examples/: the copy holds the files, as the wheel must.
    shutil.copytree(ROOT / "attnc", source / "attnc", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("attnc-*.whl")
    return wheel


def fresh_venv(where: Path) -> tuple[Path, Path]:
    """A new virtual environment without attnc that sees this one's packages (torch, Triton, lark,
    jinja2) through a .pth file, after its own: its python and its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, Path(site)


@dataclass(frozen=True)
class Installed:
    """attnc's wheel, and the python and site-packages of the fresh environment it is installed in."""

    wheel: Path
    python: Path
    site: Path


def readme_example() -> str:
    """The README's Python example for an installed attnc (the first block after "Then, from any
    directory"), as a new user would paste it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index("Then, from any directory") :]
    return after[after.index("```python\n") + len("```python\n") : after.index("\n```\n")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """attnc's wheel installed with --no-deps into a fresh virtual environment."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    python, site = fresh_venv(root / "venv")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return Installed(wheel, python, site)


def test_the_wheel_ships_the_examples_and_py_typed(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {"attnc/py.typed", "attnc/examples/__init__.py", "attnc/examples/streaming_llm.attn"} <= names
    shipped = {Path(n).name for n in names if n.startswith("attnc/examples/")}
    assert shipped >= {p.name for p in (ROOT / "examples").glob("*.attn")}


def test_the_installed_attnc_checks_an_example_from_outside_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    example = installed.site / "attnc" / "examples" / "streaming_llm.attn"
    attnc_script = installed.python.parent / "attnc"
    done = subprocess.run([attnc_script, "check", example], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{example}: ok (streaming_llm)\n"


def test_the_installed_attnc_runs_the_readme_example_unchanged_from_outside_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    # The example as the README shows it, then where attnc came from.
    script = readme_example() + "\nprint(attnc.__file__)\n"
    done = subprocess.run(
        [installed.python, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "ATTNC_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    printed, module = done.stdout.splitlines()
    assert Path(module).is_relative_to(installed.site)  # the wheel's attnc, not the checkout's
    assert printed.startswith("max error ") and float(printed.split()[-1]) < 1e-5


# ---- the package --------------------------------------------------------------------------------------


def test_version_flag_names_attnc_torch_and_triton(capsys: pytest.CaptureFixture[str]) -> None:
    import triton

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == (
        f"attnc {attnc.__version__} (torch {torch.__version__}, triton {triton.__version__})\n"
    )


def test_examples_are_found_by_name_in_the_package() -> None:
    assert (
        attnc.examples.path("streaming_llm.attn").read_text()
        == (ROOT / "examples/streaming_llm.attn").read_text()
    )


def test_an_unknown_example_names_the_examples() -> None:
    with pytest.raises(FileNotFoundError, match=r"no example 'nope.attn' in .*; examples: alibi.attn, "):
        attnc.examples.path("nope.attn")


def test_attn_module_is_the_loaded_file_type_and_module_its_alias() -> None:
    module = attnc.load(ROOT / "examples/streaming_llm.attn")
    assert type(module) is attnc.AttnModule and attnc.Module is attnc.AttnModule
    assert repr(module).startswith("<attnc.AttnModule ")


# ---- torch's conventions for bad arguments ------------------------------------------------------------

DOCUMENTS = attnc.loads(
    "pattern documents { input doc: int32[BATCH, KV_LEN]\n mask = doc[b, q] == doc[b, kv] }"
)


def test_a_bad_tensor_is_a_value_error_as_in_torch() -> None:
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="input 'doc' must have 2 dimension"):
        DOCUMENTS.documents().reference(q, q, q, doc=torch.zeros(8, dtype=torch.int32))


def test_an_argument_of_the_wrong_type_is_a_type_error_as_in_torch() -> None:
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(TypeError, match=r"input 'doc' must be a torch\.Tensor, got list") as caught:
        DOCUMENTS.documents().reference(q, q, q, doc=[[0] * 8])
    assert isinstance(caught.value, attnc.InputError)


def test_an_int64_tensor_for_an_int32_input_is_refused_with_the_conversion_to_make() -> None:
    with pytest.raises(
        attnc.InputError, match=r"must be int32, got int64 \(convert it: .to\(torch.int32\)\)"
    ):
        DOCUMENTS.documents().mask(8, 8, doc=torch.zeros(1, 8, dtype=torch.int64))


def test_a_nested_query_tensor_is_a_located_input_error() -> None:
    nested = torch.nested.nested_tensor([torch.randn(1, 5, 16), torch.randn(1, 7, 16)], layout=torch.jagged)
    with pytest.raises(
        attnc.InputError, match=r"<string>:1:9: error: q is a nested tensor: attnc takes dense"
    ):
        DOCUMENTS.documents().reference(nested, nested, nested, doc=torch.zeros(2, 7, dtype=torch.int32))


def test_a_nested_input_tensor_is_a_located_input_error() -> None:
    doc = torch.nested.nested_tensor([torch.zeros(8, dtype=torch.int32)], layout=torch.jagged)
    with pytest.raises(attnc.InputError, match=r"<string>:1:27: error: input 'doc' is a nested tensor"):
        DOCUMENTS.documents().mask(8, 8, doc=doc)
