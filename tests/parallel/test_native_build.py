"""parallel/native_build.build: sources compiled side by side into objects, linked into one
library, cached by content; a compile error is a KernelBuildError with the compiler's message
and leaves nothing half-written in the cache."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from parallel import native_build

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")


def _lib(tmp_path, bodies: dict[str, str]) -> native_build.NativeLib:
    srcs = []
    for name, body in bodies.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(body)
        srcs.append(path)
    return native_build.NativeLib("flotilla_test", tuple(srcs))


def test_two_sources_link_into_one_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOTILLA_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = _lib(
        tmp_path,
        {
            "a.cpp": 'extern "C" int twice(int x);\nextern "C" int four_times(int x) { return twice(twice(x)); }\n',
            "b.cpp": 'extern "C" int twice(int x) { return 2 * x; }\n',
        },
    )
    out = native_build.build(lib)
    assert ctypes.CDLL(str(out)).four_times(5) == 20  # a.cpp calls into b.cpp: one library
    built = out.stat().st_mtime_ns
    assert native_build.build(lib) == out and out.stat().st_mtime_ns == built  # cached
    (tmp_path / "src" / "b.cpp").write_text('extern "C" int twice(int x) { return x + x + 1; }\n')
    again = native_build.build(lib)  # a changed source is a new key
    assert again != out and ctypes.CDLL(str(again)).four_times(5) == 23
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir() if p.name != ".lock") == [
        ".so",
        ".so",
    ]


def test_a_compile_error_names_the_problem_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOTILLA_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = _lib(tmp_path, {"ok.cpp": "int fine() { return 0; }\n", "bad.cpp": "int broken( {\n"})
    with pytest.raises(native_build.KernelBuildError, match="bad.cpp"):
        native_build.build(lib)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]
