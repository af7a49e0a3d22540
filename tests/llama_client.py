"""llama.cpp as the real client of GGUF: its own converter, its loader and tokenizer, and a GGUF comparer.

Not a test file, and not named llama_cpp.py: tests/ comes first on sys.path, where that name would hide the
llama_cpp package itself. The tests import it; `make setup` runs it as a script (`python tests/llama_client.py
install`) to put llama.cpp's own converter where the tests find it:

- llama-cpp-python (pinned in constraints.txt, built from source by pip) is the loader: `load`, `logits`, `tokenize`.
- Its sdist vendors the llama.cpp tree it was built from. `install` downloads that sdist through pip (the registry is
  the only network) and extracts convert_hf_to_gguf.py, the `conversion` package it imports and the vendored
  gguf-py into VENV/share/llama.cpp/VERSION, so the converter is the one that matches the library that loads its
  output. `llama_converter` runs it in a subprocess with that gguf-py first on the path (it may differ from the
  `gguf` package installed in the venv, which the tests use only for reading).
- Mixtral's v1 tokenizer.model (32000 pieces) comes from the `mistral-common` wheel, downloaded the same way (no
  dependency of it is installed): `mixtral_tokenizer` finds it in VENV/share/mistral-common, checked by MD5.

`compare_gguf` lists every difference between two GGUF files that a loader could see, naming keys aside.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DISTRIBUTION = "llama_cpp_python"
# What convert_hf_to_gguf.py needs from the vendored tree (paths under vendor/llama.cpp/ in the sdist).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
MIXTRAL_TOKENIZER_MEMBER = "mistral_common/data/tokenizer.model.v1"
MIXTRAL_TOKENIZER_MD5 = "37974873eb68a7ab30c4912fc36264ae"  # Mixtral-8x7B's tokenizer.model, as published
SETUP_HINT = "run `make setup` (or `python tests/llama_client.py install` with the venv's python)"

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# general.* keys that carry the model's meaning; every other general.* key names or describes the model (name,
# basename, size_label, finetune, author, license, urls, base models, ...) and may differ between two writers.
GENERAL_KEYS_COMPARED = frozenset(
    {"general.architecture", "general.type", "general.file_type", "general.quantization_version", "general.alignment"}
)


# ---------------------------------------------------------------------------------------------------------------
# Where things are


def installed_version() -> str | None:
    """The installed llama-cpp-python version, or None when it is not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def share_dir(prefix: Path | None = None) -> Path:
    """VENV/share/llama.cpp/VERSION: the converter extracted from the installed version's own sdist."""
    version = installed_version()
    if version is None:
        raise RuntimeError(f"llama-cpp-python is not installed: {SETUP_HINT}")
    return Path(prefix or sys.prefix) / "share" / "llama.cpp" / version


def converter_script() -> Path:
    script = share_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise RuntimeError(f"llama.cpp's converter is not at {script}: {SETUP_HINT}")
    return script


def mixtral_tokenizer(prefix: Path | None = None) -> Path:
    """Mixtral's v1 tokenizer.model, extracted from the mistral-common wheel by `install`."""
    path = Path(prefix or sys.prefix) / "share" / "mistral-common" / "tokenizer.model.v1"
    if not path.is_file():
        raise RuntimeError(f"Mixtral's tokenizer.model is not at {path}: {SETUP_HINT}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's own converter


# Runs convert_hf_to_gguf.py's main() once per job in ONE interpreter: importing torch and the script's `conversion`
# package takes most of a run's time on a tiny model, so four outtypes cost little more than one. run_path with a
# run_name other than __main__ defines main() without calling it; the script puts its own gguf-py on sys.path.
_DRIVER = """
import json, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, script.rsplit("/", 1)[0])  # where `conversion` lives, as when the script is run directly
main = runpy.run_path(script, run_name="convert_hf_to_gguf")["main"]
for arguments in jobs:
    sys.argv = [script, *arguments]
    main()
"""


def llama_converter_many(
    hf_folder: Path, jobs: Sequence[tuple[Path, str] | tuple[Path, str, bool]], *, vocab_only: bool = False
) -> None:
    """llama.cpp's convert_hf_to_gguf.py on an HF folder once per (out_file, outtype), in one subprocess; a job
    (out_file, outtype, True) is a --vocab-only one, as is every job with vocab_only.

    A failure raises with the script's stderr.
    """
    script = converter_script()
    arguments = []
    for out_file, outtype, *only_vocab in jobs:
        arguments.append([str(hf_folder), "--outfile", str(out_file), "--outtype", outtype])
        if vocab_only or any(only_vocab):
            arguments[-1].append("--vocab-only")
    # The script puts its own gguf-py on sys.path unless NO_LOCAL_GGUF is set; PYTHONPATH says the same, so the
    # vendored copy wins over the venv's `gguf` whatever a later version of the script does.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(script.parent / "gguf-py"), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-c", _DRIVER, str(script), json.dumps(arguments)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    missing = [str(job[0]) for job in jobs if not job[0].is_file()]
    if result.returncode != 0 or missing:
        raise AssertionError(
            f"llama.cpp's converter exited {result.returncode} on {hf_folder} ({', '.join(j[1] for j in jobs)}),"
            f" missing {missing}\nstderr:\n{result.stderr[-4000:]}"
        )


def llama_converter(hf_folder: Path, out_file: Path, outtype: str, *, vocab_only: bool = False) -> Path:
    """llama.cpp's convert_hf_to_gguf.py HF_FOLDER --outfile OUT_FILE --outtype OUTTYPE [--vocab-only]."""
    llama_converter_many(hf_folder, [(out_file, outtype)], vocab_only=vocab_only)
    return out_file


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's loader (llama-cpp-python)


def load(gguf_path: Path, *, vocab_only: bool = False, n_ctx: int = 64) -> Any:
    """A llama_cpp.Llama on one or two threads, float32 KV cache, logits for every position, fixed seed.

    The KV cache defaults to F16 in llama.cpp, which alone moves float32 logits by ~1e-3 relative; F32 keeps the
    f32 comparison about the weights.
    """
    import llama_cpp  # imported here so that the module imports (and its tests skip) without llama-cpp-python

    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(gguf_path),
        vocab_only=vocab_only,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        flash_attn=False,
        type_k=f32,
        type_v=f32,
        seed=0,
        verbose=False,
    )


def logits(model: Any, tokens: Sequence[int]) -> np.ndarray:
    """float32 logits [len(tokens), vocab] for tokens at positions 0 .. len-1 (fresh KV cache)."""
    model.reset()
    model.eval(list(tokens))
    return np.array(model.scores[: len(tokens)], dtype=np.float32, copy=True)


def tokenize(model: Any, text: str, *, add_bos: bool = True) -> list[int]:
    """llama.cpp's token ids for text, special-token text read as plain text (as SentencePiece's encode does).

    With add_bos, llama.cpp adds BOS (and EOS) only as the file's tokenizer.ggml.add_bos_token/add_eos_token say.
    """
    return list(model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))


# ---------------------------------------------------------------------------------------------------------------
# Comparing two GGUF files


def _is_naming_key(key: str) -> bool:
    return key.startswith("general.") and key not in GENERAL_KEYS_COMPARED and not key.startswith("general.sampling.")


def _field_value(field: Any) -> tuple[Any, ...]:
    """(value types, value) of a GGUFReader field, arrays as lists, floats as their exact float32/64 values."""
    types = tuple(t.name for t in field.types)
    value = field.contents()
    return types, value


def _tensor_bytes(tensor: Any) -> bytes:
    return np.ascontiguousarray(tensor.data).view(np.uint8).tobytes()


def compare_gguf(ours: Path, theirs: Path, *, tensor_order: bool = False) -> list[str]:
    """Every difference between two GGUF files, one line each; [] when a loader sees the same model.

    Compared: the GGUF version and alignment; the metadata keys, their value types and values (general.* naming keys
    such as general.name, basename and size_label aside, see GENERAL_KEYS_COMPARED); the tensor names; each tensor's
    GGML type, shape and data bytes; and, with tensor_order, the order of the tensors.
    """
    from gguf import GGUFReader  # the gguf package (ggml-org's own reader)

    a, b = GGUFReader(ours), GGUFReader(theirs)
    diffs: list[str] = []

    def version(reader: GGUFReader) -> Any:
        return reader.fields["GGUF.version"].contents()

    if version(a) != version(b):
        diffs.append(f"GGUF version: ours {version(a)}, theirs {version(b)}")
    if a.alignment != b.alignment:
        diffs.append(f"alignment: ours {a.alignment}, theirs {b.alignment}")

    def keys(reader: GGUFReader) -> dict[str, Any]:
        return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.") and not _is_naming_key(k)}

    ka, kb = keys(a), keys(b)
    diffs += [f"metadata {k}: only in ours" for k in sorted(ka.keys() - kb.keys())]
    diffs += [f"metadata {k}: only in theirs" for k in sorted(kb.keys() - ka.keys())]
    for k in sorted(ka.keys() & kb.keys()):
        (ta, va), (tb, vb) = _field_value(ka[k]), _field_value(kb[k])
        if ta != tb:
            diffs.append(f"metadata {k}: type ours {'/'.join(ta)}, theirs {'/'.join(tb)}")
        elif va != vb:
            diffs.append(f"metadata {k}: ours {_short(va)}, theirs {_short(vb)}")

    tensors_a = {t.name: t for t in a.tensors}
    tensors_b = {t.name: t for t in b.tensors}
    diffs += [f"tensor {n}: only in ours" for n in tensors_a if n not in tensors_b]
    diffs += [f"tensor {n}: only in theirs" for n in tensors_b if n not in tensors_a]
    for name in (n for n in tensors_a if n in tensors_b):
        ta, tb = tensors_a[name], tensors_b[name]
        if ta.tensor_type != tb.tensor_type:
            diffs.append(f"tensor {name}: type ours {ta.tensor_type.name}, theirs {tb.tensor_type.name}")
            continue
        shape_a, shape_b = [int(x) for x in ta.shape], [int(x) for x in tb.shape]
        if shape_a != shape_b:
            diffs.append(f"tensor {name}: shape ours {shape_a}, theirs {shape_b}")
            continue
        if _tensor_bytes(ta) != _tensor_bytes(tb):
            diffs.append(f"tensor {name}: data bytes differ")
    if tensor_order and not diffs:
        order_a, order_b = list(tensors_a), list(tensors_b)
        if order_a != order_b:
            first = next(i for i, (x, y) in enumerate(zip(order_a, order_b, strict=True)) if x != y)
            diffs.append(f"tensor order: #{first} is {order_a[first]} in ours, {order_b[first]} in theirs")
    return diffs


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Setup: extract the converter (and Mixtral's tokenizer.model) from what pip downloads


def _pip_download(requirement: str, folder: Path, constraints: Path | None, *extra: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--dest", str(folder), *extra]
    if constraints is not None:
        command += ["--constraint", str(constraints)]
    subprocess.run([*command, requirement], check=True)
    (found,) = folder.iterdir()
    return found


def _extract_converter(sdist: Path, dest: Path) -> None:
    """vendor/llama.cpp/{CONVERTER_PARTS} of the sdist into dest (tarfile's "data" filter: no links out, no devices)."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)  # drop the top folder llama_cpp_python-VERSION/
            inside = parts[1] if len(parts) == 2 else ""
            if not inside.startswith("vendor/llama.cpp/"):
                continue
            relative = inside.removeprefix("vendor/llama.cpp/")
            if any(relative == p or (p.endswith("/") and relative.startswith(p)) for p in CONVERTER_PARTS):
                member.name = relative
                members.append(member)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise SystemExit(f"{sdist.name}: no vendor/llama.cpp/convert_hf_to_gguf.py in the sdist")
        tar.extractall(dest, members=members, filter="data")


def install(constraints: Path | None) -> None:
    """Put llama.cpp's converter and Mixtral's tokenizer.model under sys.prefix/share (skipping what is there)."""
    version = installed_version()
    if version is None:
        raise SystemExit(f"tests/llama_client.py: llama-cpp-python is not installed in {sys.prefix}")
    dest = share_dir()
    if not (dest / "convert_hf_to_gguf.py").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            # --no-binary: the sdist (the only distribution that holds the vendored tree), whatever wheel exists.
            sdist = _pip_download(f"llama-cpp-python=={version}", Path(tmp), None, "--no-binary", "llama-cpp-python")
            staging = dest.with_name(dest.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            _extract_converter(sdist, staging)
            staging.rename(dest)  # complete or absent: a later run retries an interrupted one
    tokenizer = Path(sys.prefix) / "share" / "mistral-common" / "tokenizer.model.v1"
    if not tokenizer.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download("mistral-common", Path(tmp), constraints, "--only-binary", ":all:")
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(MIXTRAL_TOKENIZER_MEMBER)
        digest = hashlib.md5(data).hexdigest()
        if digest != MIXTRAL_TOKENIZER_MD5:
            raise SystemExit(f"{wheel.name}: {MIXTRAL_TOKENIZER_MEMBER} has MD5 {digest}, not {MIXTRAL_TOKENIZER_MD5}")
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        partial = tokenizer.with_name(tokenizer.name + ".partial")
        partial.write_bytes(data)
        partial.rename(tokenizer)
    print(f"llama.cpp converter: {dest}\nMixtral tokenizer.model: {tokenizer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("install", help="extract llama.cpp's converter and Mixtral's tokenizer.model into the venv")
    setup.add_argument("--constraints", type=Path, help="pip constraints (the mistral-common version)")
    args = parser.parse_args()
    install(args.constraints)


if __name__ == "__main__":
    main()
