"""Where `modelgw up` keeps its state, and how other commands find it.

    data_dir = find_data_dir(args.data_dir)   # --data-dir, $MODELGW_HOME, the last `up`, ~/.modelgw
    remember_data_dir(data_dir)               # `up` says which data dir it runs on

The data dir holds etcd's data, the development issuer's key, the demo models and the
logs. `modelgw up --data-dir DIR` records DIR in a small per-user file (in
$XDG_RUNTIME_DIR, else a private directory under the system temp dir), so that
`modelgw token` run without --data-dir mints from the issuer that `up` serves.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

HOME_ENV = "MODELGW_HOME"


def default_data_dir() -> Path:
    """$MODELGW_HOME, else ~/.modelgw: where `modelgw up` runs unless told otherwise."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".modelgw")


def _last_up_file() -> Path:
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) if runtime_dir else Path(tempfile.gettempdir()) / f"modelgw-{os.getuid()}"
    return base / "modelgw-last-up.json"


def _private(directory: Path) -> bool:
    """Whether `directory` is ours alone: another user must not point us at their files."""
    try:
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def remember_data_dir(data_dir: Path) -> None:
    """Record the data dir a `modelgw up` runs on (best effort: a failure only means
    `modelgw token` needs --data-dir)."""
    path = _last_up_file()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(path.parent):
            return
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"data_dir": str(data_dir), "pid": os.getpid()}))
        temporary.replace(path)
    except OSError:
        pass


def last_up_data_dir() -> Path | None:
    """The data dir the last `modelgw up` of this user ran on, if recorded."""
    path = _last_up_file()
    if not _private(path.parent):
        return None
    try:
        return Path(json.loads(path.read_text())["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_data_dir(explicit: Path | None = None) -> Path:
    """The data dir a command means: `explicit` (its --data-dir), $MODELGW_HOME, the one
    the last `modelgw up` ran on, else ~/.modelgw; absolute."""
    if explicit is not None:
        chosen = explicit
    elif os.environ.get(HOME_ENV):
        chosen = default_data_dir()
    else:
        chosen = last_up_data_dir() or default_data_dir()
    return chosen.expanduser().resolve()
