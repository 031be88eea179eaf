"""Darknet's C implementation as an independent reference for the parity tests.

The sources live beside the project, read-only, at ``../shared/third_party/darknet`` (pinned to
pjreddie/darknet f6afaab, public domain). Nothing here copies Darknet's code: the tests copy the
sources into a temporary folder, build ``libdarknet.a`` there with the Makefile's own CPU
defaults (GPU=0, OPENMP=0, ``-Ofast``), link the project's own small C harnesses
(``tests/darknet/*.c``) against it, and compare what those print with what the project computes.

When the sources or a C compiler are missing, every test that needs them is skipped with the
reason (``darknet`` fixture in ``conftest.py``); CI has both.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS_DIR = Path(__file__).resolve().parent / "darknet"


def darknet_sources() -> Path:
    """Where Darknet's sources are: ``$DARKNET_SRC`` or ``../shared/third_party/darknet``."""
    return Path(os.environ.get("DARKNET_SRC", ROOT.parent / "shared" / "third_party" / "darknet"))


class DarknetUnavailable(Exception):
    """Darknet cannot be built here; the message says why (the tests skip with it)."""


@dataclass(frozen=True)
class DarknetBuild:
    """A built copy of Darknet: its folder (``libdarknet.a``, ``include/``, ``src/``, ``cfg/``)."""

    root: Path

    @property
    def cfg_dir(self) -> Path:
        return self.root / "cfg"

    def compile(self, source: str | Path, out_dir: Path) -> Path:
        """Compile one harness (a file in ``tests/darknet/`` or a path) against libdarknet.a."""
        source = Path(source)
        if not source.is_absolute():
            source = HARNESS_DIR / source
        exe = Path(out_dir) / source.stem
        if exe.exists():
            return exe
        cmd = ["cc", "-O2", "-I", str(self.root / "include"), "-I", str(self.root / "src"),
               str(source), str(self.root / "libdarknet.a"), "-lm", "-pthread", "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr}")
        return exe

    def run(self, exe: Path, *args, cwd: Path | None = None) -> str:
        """Run a harness; its stdout (Darknet prints its own chatter to stderr)."""
        done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                              cwd=cwd or self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{exe.name} {' '.join(map(str, args))} exited {done.returncode}:\n"
                               f"{done.stderr[-2000:]}")
        return done.stdout


def build_darknet(workdir: Path) -> DarknetBuild:
    """Copy Darknet's sources to ``workdir`` and build ``libdarknet.a`` (about 10-20 s on 2 cores)."""
    src = darknet_sources()
    if not (src / "Makefile").is_file():
        raise DarknetUnavailable(f"Darknet's sources are not at {src} (set DARKNET_SRC)")
    if shutil.which("cc") is None or shutil.which("make") is None:
        raise DarknetUnavailable("no C compiler (cc) or make on this machine")
    root = Path(workdir) / "darknet"
    shutil.copytree(src, root)
    for path in root.rglob("*"):  # the shared copy is read-only where CI runs
        path.chmod(path.stat().st_mode | 0o200)
    (root / "obj").mkdir(exist_ok=True)
    done = subprocess.run(["make", "-C", str(root), f"-j{os.cpu_count() or 2}", "libdarknet.a"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise DarknetUnavailable(f"building Darknet failed:\n{done.stderr[-2000:]}")
    return DarknetBuild(root)
