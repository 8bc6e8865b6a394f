"""Write tests/durations.json (seconds per test file) from a JUnit XML report, for the longest-first order
conftest.py gives pytest-xdist:

    make test PYTEST_ADDOPTS=--junitxml=/tmp/junit.xml && .venv/bin/python tests/update_durations.py /tmp/junit.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")


def file_seconds(junit_xml: Path) -> dict[str, float]:
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit_xml).iter("testcase"):
        seconds[case.get("classname", "").split(".")[-1] + ".py"] += float(case.get("time", 0))
    return {name: round(value, 1) for name, value in seconds.most_common()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    DURATIONS.write_text(json.dumps(file_seconds(Path(sys.argv[1])), indent=1) + "\n")
    print(f"{DURATIONS}: {len(json.loads(DURATIONS.read_text()))} files")
