"""Where model files come from: a model URI resolved to a local path.

Supported today: plain local paths, file:// URIs and pvc://CLAIM/PATH. In a Kubernetes pod
a local path or file:// URI names a file inside the container (in its image or a volume
mounted there); pvc://CLAIM/PATH is PATH inside the claim CLAIM, which the kubernetes
backend mounts read-only at /mnt/models/CLAIM (registry.validation.pvc_mount_path), so it
is read from there. Other schemes (s3://, gs://, hf://) plug in here later; until then they
get a clear error instead of a confusing one.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from modelgw.registry.validation import parse_pvc_uri, pvc_mount_path
from modelgw.runtimes.errors import ModelLoadError

SUPPORTED = "a local path, a file:// URI or pvc://CLAIM/PATH"


def local_path(uri: str) -> Path:
    """The existing local file or directory a model URI names."""
    if not uri:
        raise ModelLoadError(f"no model URI given; expected {SUPPORTED}")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ModelLoadError(f"'{uri}': file:// URIs must name a local file (file:///path)")
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "pvc":
        try:
            claim, inside = parse_pvc_uri(uri)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        path = Path(pvc_mount_path(claim), inside)
        if not path.exists():
            raise ModelLoadError(f"'{uri}': no such file or directory at {path} (is claim {claim!r} mounted there?)")
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ModelLoadError(f"'{uri}': unsupported URI scheme '{parsed.scheme}'; expected {SUPPORTED}")
    else:
        path = Path(uri).expanduser()
    if not path.exists():
        raise ModelLoadError(f"'{uri}': no such file or directory")
    return path.resolve()


def find_model_file(path: Path, suffixes: tuple[str, ...], preferred: tuple[str, ...] = ()) -> Path:
    """`path` itself if it is a file, else the model file inside the directory: the first
    of `preferred` names that exists, or the only file with one of `suffixes`."""
    if path.is_file():
        return path
    for name in preferred:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if len(found) == 1:
        return found[0]
    wanted = ", ".join(f"*{s}" for s in suffixes)
    if not found:
        raise ModelLoadError(f"'{path}': no model file ({wanted}) in this directory")
    raise ModelLoadError(
        f"'{path}': several model files ({', '.join(p.name for p in found)}); "
        "point the URI at one of them"
    )
