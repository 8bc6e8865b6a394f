"""kill -9 recovery is exact in curation: a run killed at a random point and run again writes the same shards,
byte for byte, as a run that was never interrupted. Real curate runs of a slice of the test corpus's math."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mixlab.curation.manifest import ShardManifest

SEED = int(os.environ.get("MIXLAB_KILL_SEED", "20240611"))  # another seed: another kill point
CURATE = """
import json, sys, time
from mixlab.pipelines.curate import curate, preload_heavy_modules
preload_heavy_modules()
print("started", flush=True)
start = time.perf_counter()
curate(sys.argv[1], sys.argv[2], tasks=2, workers=2)
print(json.dumps({"curate_s": time.perf_counter() - start}), flush=True)
"""


def start_curate(raw: Path, curated: Path) -> subprocess.Popen:
    """`curate` in its own process group (its forked workers die with it); stderr goes to a log beside the
    curated directory, so that a failure shows what the process said."""
    log = curated.parent / f"{curated.name}-{time.monotonic_ns()}.stderr"
    process = subprocess.Popen([sys.executable, "-c", CURATE, str(raw), str(curated)], stdout=subprocess.PIPE,
                               stderr=log.open("w"), text=True, start_new_session=True)
    process.stderr_log = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, (f"curate exited {process.returncode}; its stderr ends:\n"
                                     + process.stderr_log.read_text()[-3000:])  # type: ignore[attr-defined]
    return json.loads(out.strip().splitlines()[-1])


def shard_bytes(curated: Path) -> dict[str, bytes]:
    return {p.relative_to(curated).as_posix(): p.read_bytes() for p in sorted((curated / "data").rglob("*.parquet"))}


def test_a_curation_killed_at_random_points_resumes_to_the_same_bytes(raw_corpus: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "math").mkdir(parents=True)
    for path in sorted((raw_corpus / "math").glob("*.jsonl.gz"))[:2]:  # about half the test corpus's math
        shutil.copy(path, raw / "math" / path.name)
    whole = finish(start_curate(raw, tmp_path / "whole"))["curate_s"]

    process = start_curate(raw, tmp_path / "killed")
    assert process.stdout.readline().strip() == "started"
    time.sleep(random.Random(SEED).uniform(0.1, 0.8) * whole)  # a seeded random point of the run
    assert process.poll() is None, f"the run ended before the kill (whole run {whole:.1f} s, seed {SEED})"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    finish(start_curate(raw, tmp_path / "killed"))

    killed, whole_bytes = shard_bytes(tmp_path / "killed"), shard_bytes(tmp_path / "whole")
    assert killed.keys() == whole_bytes.keys() and whole_bytes, f"shards differ: {sorted(killed)} vs {sorted(whole_bytes)}"
    assert [k for k in killed if killed[k] != whole_bytes[k]] == [], f"seed {SEED}: resumed shards differ in bytes"
    manifest = ShardManifest.load(tmp_path / "killed")
    assert manifest.check() == [] and manifest.verify_checksums() == []
    assert manifest.source("math").steps == ShardManifest.load(tmp_path / "whole").source("math").steps
