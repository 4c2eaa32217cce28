"""Files written by the package get the mode of any new file under the process's umask.

``safetensors`` writes its files through a private temporary file, mode 0600, so weights and activation shards
would be unreadable to the owner's group and others whatever the umask says; :func:`give_umask_mode` undoes that.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_UMASK_GUARD = threading.Lock()


def current_umask() -> int:
    """The process's umask: read from ``/proc/self/status`` where there is one, else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_GUARD:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def give_umask_mode(*paths: str | os.PathLike) -> None:
    """Give each file the mode a new file gets under the umask (0644 under umask 022).

    Parameters
    ----------
    paths
        Files just written.
    """
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)
