"""llama.cpp's own way to a quantized GGUF, timed by bench/run.py as mixtral-convert's peer: two steps.

    python bench/llama_two_steps.py HF_FOLDER OUT [--ftype Q4_K_M] [--threads 2]
    python bench/llama_two_steps.py --quantize-only MODEL.gguf OUT [--ftype Q4_K_M] [--threads 2]

1. llama.cpp's converter, `convert_hf_to_gguf.py HF_FOLDER --outtype bf16`, to OUT/model-bf16.gguf: it needs the
   Hugging Face layout, and writes the whole model unquantized first (93 GB for Mixtral-8x7B).
2. `llama_model_quantize` (what the llama-quantize tool runs), from that file to OUT/model-FTYPE.gguf, with THREADS
   threads and no importance matrix.

--quantize-only runs step 2 alone on a given GGUF (the bench gives it mixtral-convert's bf16 GGUF of the same
checkpoint, which tests/test_llama_cpp.py proves identical to the converter's, naming keys aside).

Both come from the llama.cpp that the installed llama-cpp-python was built from: the library for step 2, and the
converter that `make setup` extracts from the same sdist into .venv/share/llama.cpp/VERSION (tests/llama_client.py),
run as the tests run it, with its own gguf-py first on the path. Nothing here is mixtral-convert's code.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path


def converter_script() -> Path:
    version = importlib.metadata.version("llama_cpp_python")
    script = Path(sys.prefix) / "share" / "llama.cpp" / version / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"llama.cpp's converter is not at {script}: run `make setup` (tests/llama_client.py)")
    return script


def convert_to_bf16(hf_folder: Path, out_file: Path) -> None:
    script = converter_script()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(script.parent / "gguf-py"), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, str(script), str(hf_folder), "--outfile", str(out_file), "--outtype", "bf16"]
    subprocess.run(command, env=env, check=True, stdin=subprocess.DEVNULL)


def quantize(source: Path, out_file: Path, ftype: str, threads: int) -> None:
    import llama_cpp
    from gguf import LlamaFileType

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LlamaFileType[f"MOSTLY_{ftype}"])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize({source} -> {out_file}) returned {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the hf folder (both steps) or a GGUF file (--quantize-only)")
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--quantize-only", action="store_true", help="step 2 alone, from the GGUF file given")
    parser.add_argument("--ftype", default="Q4_K_M", help="llama-quantize's type (default Q4_K_M)")
    parser.add_argument("--threads", type=int, default=2, help="llama-quantize's threads (default 2)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.source
    if not args.quantize_only:
        source = args.out / "model-bf16.gguf"
        convert_to_bf16(args.source, source)
    quantize(source, args.out / f"model-{args.ftype}.gguf", args.ftype, args.threads)


if __name__ == "__main__":
    main()
