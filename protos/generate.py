"""Regenerate the Python code for the .proto contracts: `python -m modelgw.protos.generate`.

Output is committed; tests/test_protos.py fails when it is stale. Two rewrites follow protoc:
- imports between generated modules become package-relative;
- inference_pb2 builds its descriptors in a private pool. Its symbols (package `inference`)
  are the same as those tritonclient and kserve register in the default pool, and the
  default pool refuses duplicate symbols, so sharing it would make modelgw and those
  clients impossible to import in one process. The wire format is unaffected.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ["inference.proto", "registry.proto"]
PRIVATE_POOL = {"inference_pb2.py"}


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every contract into out_dir; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_DIR / p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        if path.name in PRIVATE_POOL:
            text = text.replace(
                "DESCRIPTOR = _descriptor_pool.Default()",
                "# A private pool: see protos/generate.py.\nDESCRIPTOR = _descriptor_pool.DescriptorPool()",
            )
        path.write_text(text)
        written.append(path)
    return written


def main() -> None:
    check = "--check" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    stale = [n for n, t in fresh.items() if not (PROTO_DIR / n).exists() or (PROTO_DIR / n).read_text() != t]
    if check:
        if stale:
            raise SystemExit(f"generated code is stale: {', '.join(stale)}; run python -m modelgw.protos.generate")
        print("generated code is current")
        return
    for name, text in fresh.items():
        (PROTO_DIR / name).write_text(text)
    print(f"wrote {len(fresh)} files to {PROTO_DIR}")


if __name__ == "__main__":
    main()
