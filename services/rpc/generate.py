"""Regenerate services/rpc/dsv2/v1 from proto/dsv2/v1.

protoc writes `from dsv2.v1 import x_pb2` in the generated modules; we rewrite that to the
package path so the modules import as `services.rpc.dsv2.v1.x_pb2` without touching sys.path
(`proto` itself cannot be a Python package: Ray's dependencies already own that name).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
OUTPUT_ROOT = Path(__file__).resolve().parent
PACKAGE_PREFIX = "services.rpc."
_IMPORT_RE = re.compile(r"^from dsv2\.v1 import", re.MULTILINE)
# The message classes' __module__ must be importable too: Ray Serve pickles requests by it.
_MODULE_RE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')dsv2\.v1\.")


def generate_into(output_root: Path) -> list[Path]:
    """Run protoc on every proto/dsv2/v1/*.proto and write the rewritten modules."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(PROTO_ROOT.glob("dsv2/v1/*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for produced in sorted(Path(tmp).rglob("*.py*")):
            relative = produced.relative_to(tmp)
            text = _IMPORT_RE.sub(f"from {PACKAGE_PREFIX}dsv2.v1 import", produced.read_text())
            text = _MODULE_RE.sub(rf"\g<1>{PACKAGE_PREFIX}dsv2.v1.", text)
            target = output_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(target)
    for package_dir in (output_root / "dsv2", output_root / "dsv2" / "v1"):
        init = package_dir / "__init__.py"
        if not init.exists():
            init.write_text("")
        written.append(init)
    return written


def main() -> int:
    for path in generate_into(OUTPUT_ROOT):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
