"""Keep Hypothesis's on-disk cache out of the source tree.

Hypothesis writes a cache of source constants to `./.hypothesis` by default. The
example database is already off in every test (`database=None`); this moves the
remaining cache to the system temporary directory unless the caller chose a place
with HYPOTHESIS_STORAGE_DIRECTORY.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "kakehashi-hypothesis")
