"""The command line: `l1l2 FILES...` on real checkpoint files, and the built-in demo."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import termios
import time
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import h5py
import jsonschema
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from conftest import assert_within_ulps, exact_penalty, exact_sums, sum_ulps
from l1l2_rs._checkpoints import read

L1, L2 = 0.001, 0.01
SCHEMA = json.loads(
    importlib.resources.files("l1l2_rs").joinpath("cli_schema.json").read_text("utf-8")
)


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l1l2_rs", *args], capture_output=True, text=True, timeout=timeout
    )


def run_json(*args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """``l1l2 --json`` with L1, L2; the document, checked against the shipped schema."""
    out = run("--json", "--l1", str(L1), "--l2", str(L2), *args)
    assert "Traceback" not in out.stderr, out.stderr
    document = json.loads(out.stdout)
    jsonschema.validate(document, SCHEMA, cls=jsonschema.Draft202012Validator)
    return document, out


def tensors_of(document: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    (file,) = [file for file in document["files"] if file["path"] == str(path)]
    return {tensor["name"]: tensor for tensor in file["tensors"]}


def assert_exact(reported: dict[str, Any], x: np.ndarray) -> None:
    """The reported sums and penalty of ``x`` against exact ones (Fraction / math.fsum)."""
    abs_sum, squares = exact_sums(x)
    ulps = sum_ulps(x.dtype)
    assert reported["dtype"] == x.dtype.name
    assert reported["shape"] == list(x.shape)
    assert_within_ulps(reported["sum_abs"], float(abs_sum), np.float64, ulps)
    assert_within_ulps(reported["sum_squares"], float(squares), np.float64, ulps)
    assert_within_ulps(reported["penalty"], exact_penalty(x, L1, L2), np.float64, ulps + 2)


def assert_total(section: dict[str, Any], arrays: list[np.ndarray]) -> None:
    floats = [x for x in arrays if x.dtype.kind not in "iub"]
    abs_sum = sum((exact_sums(x)[0] for x in floats), Fraction(0))
    squares = sum((exact_sums(x)[1] for x in floats), Fraction(0))
    assert section["tensors"] == len(floats)
    assert section["sum_abs"] == pytest.approx(float(abs_sum), rel=1e-13)
    assert section["sum_squares"] == pytest.approx(float(squares), rel=1e-13)
    penalty = float(Fraction(L1) * abs_sum + Fraction(L2) * squares)
    assert section["penalty"] == pytest.approx(penalty, rel=1e-13)


def sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tensors of every readable dtype; odd sizes put later tensors at unaligned zip offsets."""
    return {
        "dense.kernel": rng.standard_normal((33, 7)).astype(np.float32),
        "dense.bias": (rng.standard_normal(7) * 1e3).astype(np.float16),
        "embed": rng.standard_normal((5, 3)),
        "odd": rng.standard_normal(3).astype(np.float32),
        "norm.scale": rng.standard_normal(11).astype(ml_dtypes.bfloat16),
        "steps": np.arange(-4, 9, dtype=np.int32),
    }


# ---------------------------------------------------------------------------------------------
# One file per format, written by its own library.


def test_safetensors_every_dtype(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = sample(rng)
    arrays["mask"] = np.array([True, False, True])
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    document, out = run_json(str(path))
    reported = tensors_of(document, path)
    assert set(reported) == set(arrays)
    for name, x in arrays.items():
        assert_exact(reported[name], x)
        assert reported[name]["float"] is (x.dtype.kind not in "iub")
    assert_total(document["files"][0]["total"], list(arrays.values()))
    assert_total(document["total"], list(arrays.values()))
    # Integer and bool tensors are listed, summed exactly, left out of the totals, and reported.
    assert reported["steps"]["sum_abs"] == sum(abs(v) for v in range(-4, 9))
    assert out.returncode == 1
    assert f"l1l2: {path}: steps: not a float tensor (int32)" in out.stderr
    assert f"l1l2: {path}: mask: not a float tensor (bool)" in out.stderr


def test_npy_and_npz(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = sample(rng)
    del arrays["steps"], arrays["norm.scale"]  # npy stores bfloat16 as raw void: not a float
    fortran = np.asfortranarray(rng.standard_normal((6, 4)).astype(np.float32))
    np.save(tmp_path / "fortran.npy", fortran)
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    document, out = run_json(
        *(str(tmp_path / n) for n in ["fortran.npy", "stored.npz", "packed.npz"])
    )
    assert out.returncode == 0, out.stderr
    assert_exact(tensors_of(document, tmp_path / "fortran.npy")["fortran.npy"], fortran)
    for archive in ["stored.npz", "packed.npz"]:
        reported = tensors_of(document, tmp_path / archive)
        assert set(reported) == set(arrays)
        for name, x in arrays.items():
            assert_exact(reported[name], x)
    assert_total(document["total"], [fortran, *arrays.values(), *arrays.values()])


def test_hdf5_contiguous_chunked_and_big_endian(tmp_path: Path, rng: np.random.Generator) -> None:
    plain = rng.standard_normal((40, 9)).astype(np.float32)
    swapped = rng.standard_normal(100).astype(">f8")
    chunked = rng.standard_normal((300, 5))
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as h5:
        h5["plain"] = plain
        h5["group/swapped"] = swapped
        h5.create_dataset("group/chunked", data=chunked, chunks=(64, 5), compression="gzip")
        h5["scalar"] = np.float32(-2.5)
    document, out = run_json(str(path))
    assert out.returncode == 0, out.stderr
    reported = tensors_of(document, path)
    assert_exact(reported["plain"], plain)
    assert_exact(reported["group/chunked"], chunked)
    assert_exact(reported["scalar"], np.array(np.float32(-2.5)))
    assert reported["group/swapped"]["dtype"] == "float64"
    assert_within_ulps(
        reported["group/swapped"]["sum_abs"], float(exact_sums(swapped)[0]), np.float64, 4
    )


def test_keras_model_and_weights_files(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5), keras.layers.BatchNormalization()]
    )
    model.layers[0].bias.assign(np.linspace(-1, 1, 5))
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    weights = [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.weights]
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED
    document, out = run_json(str(tmp_path / "model.keras"), str(tmp_path / "model.weights.h5"))
    assert out.returncode == 0, out.stderr
    for file in document["files"]:
        assert len(file["tensors"]) == len(weights)
        assert_total(file["total"], weights)
        # Each reported tensor is one of the model's variables (matched by its exact sums).
        expected = sorted((list(w.shape), float(exact_sums(w)[1])) for w in weights)
        got = sorted((t["shape"], t["sum_squares"]) for t in file["tensors"])
        assert [shape for shape, _ in got] == [shape for shape, _ in expected]
        for (_, value), (_, reference) in zip(got, expected, strict=True):
            assert value == pytest.approx(reference, rel=1e-13)


def test_torch_files(tmp_path: Path, rng: np.random.Generator) -> None:
    kernel = rng.standard_normal((8, 3)).astype(np.float32)
    half = rng.standard_normal(10).astype(np.float16)
    bf16 = rng.standard_normal(6).astype(ml_dtypes.bfloat16)
    state = {
        "model": {
            "kernel": torch.from_numpy(kernel),
            "half": torch.from_numpy(half),
            "bf16": torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16),
            "strided": torch.from_numpy(kernel).t()[::2],
        },
        "epoch": 7,
    }
    torch.save(state, tmp_path / "ckpt.pt")
    torch.save(state["model"], tmp_path / "pytorch_model.bin")
    document, out = run_json(str(tmp_path / "ckpt.pt"), str(tmp_path / "pytorch_model.bin"))
    assert out.returncode == 0, out.stderr
    reported = tensors_of(document, tmp_path / "ckpt.pt")
    assert set(reported) == {"model.kernel", "model.half", "model.bf16", "model.strided"}
    assert_exact(reported["model.kernel"], kernel)
    assert_exact(reported["model.half"], half)
    assert_exact(reported["model.bf16"], bf16)
    assert_exact(reported["model.strided"], kernel.T[::2])
    assert set(tensors_of(document, tmp_path / "pytorch_model.bin")) == {
        "kernel",
        "half",
        "bf16",
        "strided",
    }


def test_sharded_torch_checkpoint(tmp_path: Path, rng: np.random.Generator) -> None:
    first = rng.standard_normal((4, 5)).astype(np.float32)
    second = rng.standard_normal(9)
    torch.save({"first": torch.from_numpy(first)}, tmp_path / "pytorch_model-1.bin")
    torch.save({"second": torch.from_numpy(second)}, tmp_path / "pytorch_model-2.bin")
    weight_map = {"first": "pytorch_model-1.bin", "second": "pytorch_model-2.bin"}
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    document, out = run_json(str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert [(Path(f["path"]).name, f["format"]) for f in document["files"]] == [
        ("pytorch_model-1.bin", "torch"),
        ("pytorch_model-2.bin", "torch"),
    ]
    assert_exact(tensors_of(document, tmp_path / "pytorch_model-1.bin")["first"], first)
    assert_exact(tensors_of(document, tmp_path / "pytorch_model-2.bin")["second"], second)


def write_shards(tmp_path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = sample(rng)
    del arrays["steps"]
    names = sorted(arrays)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for shard, members in shards.items():
        safetensors.numpy.save_file({n: arrays[n] for n in members}, str(tmp_path / shard))
    weight_map = {name: shard for shard, members in shards.items() for name in members}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return arrays


def test_sharded_index_directory_and_glob(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = write_shards(tmp_path, rng)
    for argument in [
        str(tmp_path / "model.safetensors.index.json"),
        str(tmp_path),
        str(tmp_path / "*.json"),
    ]:
        document, out = run_json(argument)
        assert out.returncode == 0, (argument, out.stderr)
        # The shards once each, through the index (a directory holds the index and the shards).
        assert [Path(f["path"]).name for f in document["files"]] == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
        reported = {
            n: t
            for f in document["files"]
            for n, t in tensors_of(document, Path(f["path"])).items()
        }
        assert set(reported) == set(arrays)
        for name, x in arrays.items():
            assert_exact(reported[name], x)
        assert_total(document["total"], list(arrays.values()))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    document, out = run_json(str(tmp_path / "model.safetensors.index.json"))
    assert out.returncode == 1
    shard = tmp_path / "model-00002-of-00002.safetensors"
    assert f"l1l2: {shard}: ghost: listed in the index but not in this shard" in out.stderr
    assert_total(document["total"], list(arrays.values()))


def test_recursive_directory_search(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.standard_normal(10).astype(np.float32)
    (tmp_path / "a" / "b").mkdir(parents=True)
    np.save(tmp_path / "a" / "b" / "deep.npy", x)
    np.save(tmp_path / "top.npy", x)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    document, out = run_json(str(tmp_path))
    assert out.returncode == 0, out.stderr
    # A directory's own files first, then its subdirectories, each in name order.
    assert [f["path"] for f in document["files"]] == [
        str(tmp_path / "top.npy"),
        str(tmp_path / "a" / "b" / "deep.npy"),
    ]
    for file in document["files"]:
        assert_exact(next(iter(file["tensors"])), x)
    document, _ = run_json(str(tmp_path / "**" / "*.npy"))
    assert len(document["files"]) == 2


# ---------------------------------------------------------------------------------------------
# Zero copy: the mapped formats hand the core views of a file mapping.


def mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory belongs to a memory map of a file."""
    base: Any = array
    while base is not None:
        if isinstance(base, (mmap.mmap, np.memmap)):
            return True
        base = getattr(base, "base", None)
    return False


def test_mapped_formats_are_read_in_place(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = {"a": rng.standard_normal(100).astype(np.float32), "b": np.ones((4, 4))}
    safetensors.numpy.save_file(arrays, str(tmp_path / "x.safetensors"))
    np.save(tmp_path / "x.npy", arrays["a"])
    np.savez(tmp_path / "x.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        h5["a"] = arrays["a"]
        h5.create_dataset("chunked", data=arrays["b"], chunks=(2, 2))
    for name in ["x.safetensors", "x.npy", "x.npz", "x.h5"]:
        with contextlib.ExitStack() as stack:
            (checkpoint,) = read(str(tmp_path / name), stack)
            for tensor in checkpoint.tensors:
                if tensor.name != "chunked":
                    assert tensor.array is not None and mapped(tensor.array), (name, tensor.name)
                else:
                    assert tensor.array is None and tensor.pieces is not None
    with contextlib.ExitStack() as stack:
        (checkpoint,) = read(str(tmp_path / "packed.npz"), stack)
        assert all(t.array is None and t.pieces is not None for t in checkpoint.tensors)


# ---------------------------------------------------------------------------------------------
# Bad input: one line per problem, exit status 1, and the other files still reported.


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


class Payload:
    """Unpickling this runs ``touch <marker>``: nothing may ever unpickle it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malformed_files_each_get_one_line(tmp_path: Path, rng: np.random.Generator) -> None:
    good = rng.standard_normal(50).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = {
        "huge_header.safetensors": (1 << 20).to_bytes(8, "little") + b"{}",
        "overlap.safetensors": safetensors_bytes(
            {"a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)
        ),
        "gap.safetensors": safetensors_bytes(
            {"a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20)
        ),
        "dtype.safetensors": safetensors_bytes({"a": {**f32, "dtype": "F7"}}, bytes(8)),
        "short.safetensors": safetensors_bytes({"a": f32}, bytes(4)),
        "not_json.safetensors": (4).to_bytes(8, "little") + b"{{{{",
        "empty.npy": b"",
        "tiny.safetensors": b"\x01\x02",
        "weights.txt": b"hello",
        "broken.npz": b"PK not really",
        "broken.h5": b"\x89HDF\r\n\x1a\n but not",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    whole = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[: len(whole) - 8])
    marker = tmp_path / "pickle-ran"
    np.save(
        tmp_path / "objects.npy", np.array([Payload(marker), 1], dtype=object), allow_pickle=True
    )
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, tmp_path / "evil.pt")
    names = [*cases, "cut.npy", "objects.npy", "evil.pt", "missing.safetensors"]
    document, out = run_json(str(tmp_path / "good.npy"), *(str(tmp_path / n) for n in names))
    assert out.returncode == 1
    assert not marker.exists(), "a pickled payload was executed"
    lines = out.stderr.strip().splitlines()
    says = {
        "huge_header.safetensors": "header",
        "overlap.safetensors": "offset",
        "gap.safetensors": "offset",
        "dtype.safetensors": "F7",
        "short.safetensors": "header",
        "not_json.safetensors": "JSON",
        "empty.npy": "empty",
        "tiny.safetensors": "header",
        "weights.txt": "unknown file type",
        "broken.npz": "zip",
        "broken.h5": "HDF5",
        "cut.npy": "truncated",
        "objects.npy": "pickled data is never loaded",
        "evil.pt": "weights_only",
        "missing.safetensors": "No such file",
    }
    for name, text in says.items():
        (line,) = [line for line in lines if line.startswith(f"l1l2: {tmp_path / name}: ")]
        assert text in line, line
    assert len(lines) == len(says)
    (file,) = document["files"]
    assert_exact(tensors_of(document, tmp_path / "good.npy")["good.npy"], good)
    assert file["path"] == str(tmp_path / "good.npy")
    assert len(document["errors"]) == len(says)


def test_unsupported_dtypes_are_per_tensor(tmp_path: Path, rng: np.random.Generator) -> None:
    kernel = rng.standard_normal(16).astype(np.float32)
    header = {
        "fp8": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]},
        "kernel": {"dtype": "F32", "shape": [16], "data_offsets": [4, 68]},
    }
    (tmp_path / "fp8.safetensors").write_bytes(
        safetensors_bytes(header, bytes(4) + kernel.tobytes())
    )
    np.savez(tmp_path / "mixed.npz", z=np.ones(3, np.complex64), w=kernel)
    document, out = run_json(str(tmp_path / "fp8.safetensors"), str(tmp_path / "mixed.npz"))
    assert out.returncode == 1
    assert (
        f"l1l2: {tmp_path / 'fp8.safetensors'}: fp8: dtype F8_E4M3 is not supported" in out.stderr
    )
    assert f"l1l2: {tmp_path / 'mixed.npz'}: z: dtype complex64 is not supported" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 2
    assert_exact(tensors_of(document, tmp_path / "fp8.safetensors")["kernel"], kernel)
    assert_exact(tensors_of(document, tmp_path / "mixed.npz")["w"], kernel)
    assert_total(document["total"], [kernel, kernel])


def test_unaligned_and_byte_swapped_data_is_read_in_pieces(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    kernel = rng.standard_normal(1000).astype(np.float32)
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "kernel": {"dtype": "F32", "shape": [1000], "data_offsets": [1, 4001]},
    }
    path = tmp_path / "odd.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\x07" + kernel.tobytes()))
    with contextlib.ExitStack() as stack:
        (checkpoint,) = read(str(path), stack)
        array = checkpoint.tensors[1].array
        assert array is not None and not array.flags.aligned
    document, out = run_json("--filter", "kernel", str(path))
    assert out.returncode == 0, out.stderr
    assert_exact(tensors_of(document, path)["kernel"], kernel)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones(3))
    for args in [["--l1", "-1"], ["--l2", "nan"], ["--top", "0"], ["--top", "x"], ["--bogus"]]:
        out = run(*args, str(tmp_path / "a.npy"))
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stdout == ""
    out = run(str(tmp_path / "nothing*.npy"), str(tmp_path / "a.npy"))
    assert out.returncode == 1
    assert f"l1l2: {tmp_path / 'nothing*.npy'}: no file matches this pattern" in out.stderr
    assert "a.npy" in out.stdout


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, --filter, --top.


def test_table_lists_tensors_and_totals(tmp_path: Path) -> None:
    safetensors.numpy.save_file(
        {"w": np.array([3.0, -4.0], np.float32), "b": np.array([0.5], np.float32)},
        str(tmp_path / "m.safetensors"),
    )
    out = run("--l1", "0.5", "--l2", "0.25", str(tmp_path / "m.safetensors"))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
    # w: |x| 7, x^2 25, penalty 3.5 + 6.25; b: 0.5, 0.25, 0.3125; total 10.0625
    assert rows["w"][1:] == ["float32", "(2,)", "7", "25", "9.75", f"{9.75 / 10.0625:.1%}"]
    assert rows["b"][1:] == ["float32", "(1,)", "0.5", "0.25", "0.3125", f"{0.3125 / 10.0625:.1%}"]
    assert out.stdout.strip().splitlines()[-1].endswith("penalty 10.0625")


def test_filter_top_and_non_finite_values(tmp_path: Path) -> None:
    arrays = {
        "enc.0.weight": np.full(4, 2.0, np.float32),
        "enc.1.weight": np.full(4, 3.0, np.float32),
        "enc.1.bias": np.full(4, 1.0, np.float32),
        "dec.weight": np.array([np.inf, 1.0], np.float32),
        "dec.nan": np.array([np.nan], np.float32),
    }
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    document, out = run_json("--filter", "enc.*.weight", str(path))
    assert out.returncode == 0, out.stderr
    assert set(tensors_of(document, path)) == {"enc.0.weight", "enc.1.weight"}
    assert_total(document["total"], [arrays["enc.0.weight"], arrays["enc.1.weight"]])
    document, _ = run_json("--filter", "enc.*", "--filter", "dec.weight", "--top", "2", str(path))
    listed = [t["name"] for t in document["files"][0]["tensors"]]
    assert listed == ["dec.weight", "enc.1.weight"]  # largest first
    assert document["total"]["tensors"] == 4  # --top lists fewer, the totals keep all
    assert document["total"]["penalty"] == "inf"
    assert tensors_of(document, path)["dec.weight"]["sum_squares"] == "inf"
    document, _ = run_json("--filter", "dec.nan", str(path))
    assert tensors_of(document, path)["dec.nan"]["penalty"] == "nan"


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    np.savez(tmp_path / "many.npz", **{f"w{i}": np.ones(3) for i in range(3000)})
    child = subprocess.Popen(
        [sys.executable, "-m", "l1l2_rs", str(tmp_path / "many.npz")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # as `| head` does once it has its lines
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1
    assert stderr == "", stderr


# ---------------------------------------------------------------------------------------------
# Large inputs: memory, progress bar.


def sparse_safetensors(path: Path, count: int, values: dict[int, float]) -> np.ndarray:
    """A float32 safetensors file of ``count`` elements, zeros (a sparse file) but for
    ``values``; written by hand: 8-byte length, JSON header, data. Returns the non-zeros."""
    header = safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}, b""
    )
    with open(path, "wb") as file:
        file.write(header)
        file.truncate(len(header) + 4 * count)
        for position, value in values.items():
            file.seek(len(header) + 4 * position)
            file.write(np.float32(value).tobytes())
    return np.array(list(values.values()), np.float32)


def peak_anonymous_memory(*args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """The largest RssAnon of ``l1l2 ARGS`` seen while it runs (sampled every 2 ms), in bytes."""
    child = subprocess.Popen(
        [sys.executable, "-m", "l1l2_rs", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.002)
    stdout, stderr = child.communicate()
    return peak, subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def test_a_2_gb_file_is_not_copied_into_memory(tmp_path: Path) -> None:
    count = (2 << 30) // 4
    values = {0: 1.5, 12345: -2.0, count // 2: 3.25, count - 1: -0.5}
    nonzero = sparse_safetensors(tmp_path / "big.safetensors", count, values)
    sparse_safetensors(tmp_path / "small.safetensors", 1000, {0: 1.0})
    baseline, _ = peak_anonymous_memory(str(tmp_path / "small.safetensors"))
    peak, out = peak_anonymous_memory("--json", str(tmp_path / "big.safetensors"))
    assert out.returncode == 0, out.stderr
    assert peak - baseline < 50 << 20, f"RssAnon grew by {(peak - baseline) >> 20} MiB"
    document = json.loads(out.stdout)
    total = document["total"]
    assert total["sum_abs"] == math.fsum(abs(float(v)) for v in nonzero)
    assert total["sum_squares"] == math.fsum(float(v) ** 2 for v in nonzero)


def read_terminal(args: list[str]) -> tuple[str, int]:
    """Run ``args`` with stderr on a pseudo-terminal (stdout piped); what the terminal got."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    received = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        received += data
    os.close(leader)
    child.communicate()
    return received.decode(errors="replace"), child.returncode


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    sparse_safetensors(path, (1100 << 20) // 4, {7: 2.0})
    command = [sys.executable, "-m", "l1l2_rs", str(path)]
    terminal, code = read_terminal(command)
    assert code == 0
    assert "%|" in terminal and "B/s" in terminal, terminal
    piped = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == ""
    # Without tqdm: one note, and the numbers all the same.
    without = [
        sys.executable,
        "-c",
        "import sys; sys.modules['tqdm'] = None; from l1l2_rs.__main__ import main; "
        f"sys.exit(main([{str(path)!r}]))",
    ]
    terminal, code = read_terminal(without)
    assert code == 0 and "no progress bar: tqdm is not installed" in terminal
    small = tmp_path / "small.safetensors"
    sparse_safetensors(small, 1000, {7: 2.0})
    terminal, code = read_terminal([sys.executable, "-m", "l1l2_rs", str(small)])
    assert code == 0 and terminal == ""


# ---------------------------------------------------------------------------------------------
# The demo.


def test_demo_without_files() -> None:
    out = run("--size", "200000")
    assert out.returncode == 0, out.stderr
    assert "l1l2_rs:" in out.stdout and "numpy:" in out.stdout and "speed-up" in out.stdout
    ours = float(out.stdout.split("l1l2_rs:")[1].split()[0])
    reference = float(out.stdout.split("numpy:")[1].split()[0])
    assert ours == pytest.approx(reference, rel=1e-5)


def test_console_script_is_installed() -> None:
    # pip puts the entry point beside the interpreter of the environment it installed into.
    script = Path(sys.executable).parent / "l1l2"
    assert script.is_file(), f"no l1l2 console script beside {sys.executable}"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "penalty" in out.stdout and "safetensors" in out.stdout


def test_demo_sizes_are_checked() -> None:
    scientific = run("--size", "2e5")
    assert scientific.returncode == 0, scientific.stderr
    for bad in ("0", "-5", "1.5", "lots"):
        out = run("--size", bad)
        assert out.returncode == 2 and "--size" in out.stderr and "Traceback" not in out.stderr
    for huge in ("1e15", "1e30"):  # 3.6 PiB; beyond numpy's largest dimension
        out = run("--size", huge)
        assert out.returncode == 1 and "not enough memory" in out.stderr, out.stderr


def _member_grown_in_directory(path: Path, promised: int) -> bytes:
    """An ``.npz`` of ``np.ones(10)`` whose member header promises ``promised`` elements, and
    whose zip directory claims the member is as large as that: only the data is not there."""
    np.savez(path, a=np.ones(10))
    data = bytearray(path.read_bytes())
    header_at = data.index(b"'shape': (10,)")
    grown = f"'shape': ({promised},)".encode()
    data[header_at : header_at + len(grown)] = grown.ljust(len(b"'shape': (10,)"))[: len(grown)]
    extra = (promised - 10) * 8
    with zipfile.ZipFile(path) as archive:
        member = archive.infolist()[0]
    directory = data.rindex(b"PK\x01\x02")
    sizes = directory + 20  # compressed size, then uncompressed size, in the central directory
    compressed, uncompressed = struct.unpack_from("<II", data, sizes)
    struct.pack_into("<II", data, sizes, compressed + extra, uncompressed + extra)
    assert member.file_size == uncompressed
    return bytes(data)


def test_a_member_promising_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "grown.npz"
    # 12 elements: 16 bytes more than the member, which the zip's own directory would supply.
    bad.write_bytes(_member_grown_in_directory(bad, 12))
    good = tmp_path / "good.npy"
    np.save(good, np.full(3, 2.0))
    out = run(str(bad), str(good))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "grown.npz" in out.stderr and "extends past" in out.stderr, out.stderr
    assert "good.npy" in out.stdout


def test_corrupt_archives_and_indexes_are_reported_not_raised(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.npz"
    np.savez_compressed(damaged, a=np.random.default_rng(0).standard_normal(100_000))
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside the deflate stream
    damaged.write_bytes(bytes(data))
    nested = tmp_path / "model.safetensors.index.json"
    nested.write_text("[" * 200_000 + "]" * 200_000)
    good = tmp_path / "good.npy"
    np.save(good, np.full(3, 2.0))
    out = run(str(damaged), str(nested), str(good))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("l1l2: ")]
    assert any("damaged.npz" in line for line in lines), out.stderr
    assert any("index.json" in line for line in lines), out.stderr
    assert "good.npy" in out.stdout


def test_penalty_of_float64_at_the_ends_of_the_range(tmp_path: Path) -> None:
    # sum x^2 = 4e400 overflows float64, but l2 * sum x^2 = 4e100 does not.
    huge = tmp_path / "huge.npy"
    np.save(huge, np.full(4, 1e200))
    out = run("--json", "--l1", "0", "--l2", "1e-300", str(huge))
    assert out.returncode == 0, out.stderr
    (tensor,) = json.loads(out.stdout)["files"][0]["tensors"]
    exact = Fraction(4) * Fraction(1e200) ** 2 * Fraction(1e-300)
    assert tensor["penalty"] == pytest.approx(float(exact), rel=1e-15)
