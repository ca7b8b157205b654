"""What produced an output: lorapipe's version and the git commit of the code (one place each)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def lorapipe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorapipe")
    except PackageNotFoundError:
        return "0+unknown"


def git_commit(root: Optional[Path] = None, *, mark_dirty: bool = False) -> Optional[str]:
    """HEAD of the checkout holding `root` (default: this package), '-dirty' appended when asked
    and tracked files have uncommitted changes. Inside a Ray job the checkout is not shipped
    (.git is excluded), so `lorapipe submit` passes its commit as LORAPIPE_GIT_COMMIT."""
    cwd = root or PACKAGE_DIR
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return os.environ.get("LORAPIPE_GIT_COMMIT") or None
        dirty = ""
        if mark_dirty:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = "-dirty" if status else ""
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORAPIPE_GIT_COMMIT") or None
    return head.stdout.strip() + dirty
