"""The end of a probe (``meta_probe.py``, ``massive_probe.py``): time and load average, printed
as one JSON object and written to ``--out`` when given."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def finish(res: dict[str, Any], t0: float, out: str = "") -> None:
    res["seconds"] = time.time() - t0
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
