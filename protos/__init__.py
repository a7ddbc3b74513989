"""gRPC stubs for recserve.proto, generated on first import instead of committed.

Generated code goes stale silently when the .proto changes and drifts from the installed
protobuf runtime, so the stubs are rebuilt whenever the .proto text or the grpcio-tools
version changes: they live in `_gen/<hash>/` (git-ignored; a user cache dir if the package
is read-only). Each process generates into a private temp dir and renames it into place,
so concurrent first imports (several workers, pytest-xdist) never see half-written files.

    from protos import pb2, pb2_grpc
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("recserve.proto")


def _stub_dir() -> Path:
    from grpc_tools.grpc_version import VERSION

    key = hashlib.sha256(PROTO.read_bytes() + VERSION.encode()).hexdigest()[:16]
    for base in (PROTO.parent / "_gen", Path.home() / ".cache" / "recserve" / "protos"):
        out = base / key
        if (out / "recserve_pb2_grpc.py").exists():
            return out
        try:
            base.mkdir(parents=True, exist_ok=True)
            _generate(base, out)
            return out
        except PermissionError:
            continue
    raise RuntimeError(f"cannot write generated stubs for {PROTO} anywhere")


def _generate(base: Path, out: Path) -> None:
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).with_name("_proto")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{well_known}",
                          f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                          str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc}); see stderr")
        try:
            tmp.chmod(0o755)              # mkdtemp makes it private
            os.replace(tmp, out)          # atomic; fails if another process won the race
        except OSError:
            if not (out / "recserve_pb2_grpc.py").exists():
                raise
        for old in base.iterdir():        # stubs of earlier .proto versions
            if old.name != out.name and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _import_stubs() -> tuple[ModuleType, ModuleType]:
    d = _stub_dir()
    pb2 = _load(f"{__name__}.recserve_pb2", d / "recserve_pb2.py")
    # The generated grpc module does `import recserve_pb2`, and the message classes name
    # `recserve_pb2` as their module, which pickle (Ray Serve ships requests to replicas that
    # way) must import: register that name too, without touching sys.path.
    sys.modules["recserve_pb2"] = pb2
    pb2_grpc = _load(f"{__name__}.recserve_pb2_grpc", d / "recserve_pb2_grpc.py")
    return pb2, pb2_grpc


pb2, pb2_grpc = _import_stubs()

__all__ = ["pb2", "pb2_grpc", "PROTO"]
