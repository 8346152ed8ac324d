"""Download the wheels a GPU machine without network lacks, build advpipe's own, and print the install command.

The lent accelerator (docs/gpu.md) has Python 3.12 with torch, torchvision, timm, numba, typer,
rich, pyyaml, fsspec, aiohttp, pytest and more, but not zarr, numcodecs, dask/distributed or
segmentation-models-pytorch, and it cannot reach any registry. This script, run where pip works:

1. downloads, with ``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on manylinux
   x86-64, exactly the pinned wheels below (versions tested together in this repo's environment);
2. builds advpipe's wheel from this checkout into the same folder;
3. checks every run-time requirement of those wheels (extras included where asked for, markers
   evaluated for CPython 3.12 on Linux x86-64) is either shipped here or already on the machine
   (:data:`DEVICE_HAS`, read off the machine's package list), so a missing dependency shows up here,
   not in the lease;
4. prints the command that installs them there from that folder alone.

Run: ``python benchmarks/gpu/prepare_wheels.py [--dest benchmarks/gpu/wheels] [--skip-download]``.
The folder is git-ignored; carry it to the machine (``carry: ["benchmarks/gpu/wheels"]``).
"""

from __future__ import annotations

import argparse
import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DEST = Path(__file__).resolve().parent / "wheels"
TARGET = "/tmp/site"

#: what the machine lacks, pinned to the versions this repo's test environment runs (pyproject's
#: ranges: zarr>=3.1, numcodecs>=0.13, dask[distributed]>=2024.1, segmentation-models-pytorch>=0.3)
PINS = (
    "zarr==3.1.6", "numcodecs==0.16.6", "donfig==0.8.1.post1", "google-crc32c==1.9.0",
    "dask==2026.8.0", "distributed==2026.8.0", "partd==1.4.2", "locket==1.0.0", "zict==3.0.0",
    "tblib==3.2.2", "tornado==6.6.1", "segmentation-models-pytorch==0.6.0",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")

#: the Python packages of the machine's image (device README, KINDS.md, read 2026-11-17); a name
#: here is never shipped, so the machine's own version wins
DEVICE_HAS = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

#: the environment pip's markers are evaluated in: the machine's CPython 3.12 on Linux x86-64
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def wheel_metadata(path: Path) -> email.message.Message:
    """The METADATA of a wheel file."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def _applies(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` is needed on the machine when the wheel was asked for with ``extras``."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in (extras or {""}))


def missing_requirements(wheels: list[Path], available: frozenset[str] = DEVICE_HAS) -> list[str]:
    """Run-time requirements of ``wheels`` that neither they nor ``available`` provide ("wheel: requirement")."""
    meta = {canonicalize_name(m["Name"]): m for m in map(wheel_metadata, wheels)}
    shipped = set(meta)
    missing: list[str] = []
    todo = [(name, set()) for name in meta]  # (package, extras asked for)
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        for line in meta[name].get_all("Requires-Dist") or []:
            req = Requirement(line)
            if not _applies(req, extras):
                continue
            dep = canonicalize_name(req.name)
            if dep in shipped:
                todo.append((dep, set(req.extras)))
            elif dep not in available:
                missing.append(f"{name}: {line}")
    return sorted(set(missing))


def duplicates(wheels: list[Path]) -> list[str]:
    """Package names with more than one wheel in the folder (two versions stop the install there)."""
    names = [canonicalize_name(wheel_metadata(w)["Name"]) for w in wheels]
    return sorted({n for n in names if names.count(n) > 1})


def download(dest: Path) -> None:
    """``pip download`` the pinned wheels for CPython 3.12 manylinux x86-64 into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *PINS]
    subprocess.run(cmd, check=True)


def build_advpipe(dest: Path) -> Path:
    """Build advpipe's wheel from this checkout into ``dest`` (replacing an older one) and return it."""
    for old in dest.glob("advpipe-*.whl"):
        old.unlink()
    scratch = ROOT / "build"
    had_scratch = scratch.exists()
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(ROOT)]
    subprocess.run(cmd, check=True)
    if not had_scratch:
        shutil.rmtree(scratch, ignore_errors=True)  # setuptools' scratch folder, ours alone
    return next(dest.glob("advpipe-*.whl"))


def install_command(dest: Path) -> str:
    """The shell line that installs the folder's wheels on the machine and exports the PYTHONPATH."""
    rel = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {TARGET} "
            f"{rel}/*.whl && export PYTHONPATH={TARGET}")


def main(argv: list[str] | None = None) -> int:
    """Download, build, check and print; exit 1 when a requirement is missing or a package is there twice."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST, help="wheel folder (default: benchmarks/gpu/wheels)")
    parser.add_argument("--skip-download", action="store_true", help="only rebuild advpipe's wheel and check")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if not args.skip_download:
        download(dest)
    build_advpipe(dest)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {dest}")
    problems = [f"missing on the machine: {m}" for m in missing_requirements(wheels)]
    problems += [f"more than one wheel of {n}: keep one" for n in duplicates(wheels)]
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print("On the GPU machine, from the repository root (the wheel folder carried along):")
    print(f"  {install_command(dest)}")
    print("  PYTHONUNBUFFERED=1 python3 benchmarks/gpu/run_kit.py gpu_kit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
