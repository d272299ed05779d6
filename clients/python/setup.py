"""Build step: generate the gRPC stubs of fieldkey.v1 from the repository's proto/.

The stubs are not committed. `pip install clients/python` (or building a wheel) runs
grpcio-tools' bundled protoc over ``proto/fieldkey/v1/fieldkey.proto`` and writes
``src/fieldkey/v1/fieldkey_pb2.py``, ``fieldkey_pb2.pyi`` and ``fieldkey_pb2_grpc.py``
before the package is assembled. The proto is looked for in $FIELDKEY_PROTO_DIR, then
in ``../../proto`` (this repository's layout), then in ``./proto`` (an sdist).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_REL = Path("fieldkey") / "v1" / "fieldkey.proto"


def proto_root() -> Path:
    candidates = []
    if os.environ.get("FIELDKEY_PROTO_DIR"):
        candidates.append(Path(os.environ["FIELDKEY_PROTO_DIR"]))
    candidates += [HERE.parent.parent / "proto", HERE / "proto"]
    for c in candidates:
        if (c / PROTO_REL).is_file():
            return c
    raise SystemExit(
        "fieldkey: cannot find proto/fieldkey/v1/fieldkey.proto "
        f"(looked in {', '.join(str(c) for c in candidates)}); set FIELDKEY_PROTO_DIR"
    )


class generate_stubs(Command):
    description = "generate fieldkey.v1 gRPC stubs with grpcio-tools"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        from grpc_tools import protoc  # build-time dependency (pyproject.toml)
        import grpc_tools

        root = proto_root()
        out = HERE / "src"
        pkg = out / "fieldkey" / "v1"
        pkg.mkdir(parents=True, exist_ok=True)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(root / PROTO_REL),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("fieldkey: protoc failed on " + str(root / PROTO_REL))
        (pkg / "__init__.py").write_text(
            '"""Generated gRPC stubs of fieldkey.v1 (from proto/; do not edit)."""\n'
        )


class build_py_with_stubs(build_py):
    def run(self) -> None:
        self.run_command("generate_stubs")
        super().run()


class egg_info_with_stubs(egg_info):
    """egg_info lists the package's files, so the stubs must exist before it runs."""

    def run(self) -> None:
        self.run_command("generate_stubs")
        super().run()


class sdist_with_proto(sdist):
    """An sdist carries the proto, so it builds outside the repository."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        dest = Path(base_dir) / "proto" / PROTO_REL
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto_root() / PROTO_REL, dest)


setup(
    cmdclass={
        "generate_stubs": generate_stubs,
        "build_py": build_py_with_stubs,
        "egg_info": egg_info_with_stubs,
        "sdist": sdist_with_proto,
    }
)
