"""Generate the Python gRPC stubs in npcd/service/_proto from proto/npcd/v1/npcd.proto.

The stubs are committed so that `pip install` needs no build step; run this
after editing the proto (`make proto`). tests/service/test_proto.py fails when the
committed stubs no longer match the proto.

protoc names the generated modules after the proto's path (npcd/v1/...), which
would clash with our own `npcd` package, so we generate into a temporary tree
and rewrite the one cross-module import to point at `npcd.service._proto`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILE = "npcd/v1/npcd.proto"
OUT_DIR = ROOT / "npcd" / "service" / "_proto"
GENERATED = ("npcd_pb2.py", "npcd_pb2.pyi", "npcd_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Write the three generated modules into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_DIR / PROTO_FILE),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        src = Path(tmp) / "npcd" / "v1"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (src / name).read_text()
            text = text.replace("from npcd.v1 import npcd_pb2", "from npcd.service._proto import npcd_pb2")
            (out_dir / name).write_text(text)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs for proto/npcd/v1/npcd.proto (scripts/gen_proto.py)."""\n')


def main() -> int:
    generate(OUT_DIR)
    print(f"generated {', '.join(GENERATED)} in {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
