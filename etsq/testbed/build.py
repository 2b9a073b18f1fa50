"""Building, caching and shipping the testbed models: `build`, `testbed_paths`, `ship`.

A build is named by a hash of the training code (the source of `arith`, `tokenizer` and `train`),
the seed and the configuration: `$ETSQ_HOME/testbed/<hash12>/{policy,prm}`, each a standard
checkpoint directory (`save_pretrained` of the model and the tokenizer), plus `build.json` (the
seed, configuration and timings).  A build directory is complete or absent: it is written beside
its final place and moved there with one `os.replace`, so an interrupted build leaves at most a
hidden temporary directory (removed on the way out where possible) and the next call rebuilds.

The default build (seed 0, `DEFAULT`) ships inside the package (`etsq/data/testbed/<hash12>/`), so a
fresh install needs no training; `testbed_paths` finds it while its hash matches the current code.
Library versions are not part of the hash: a different torch may train slightly different weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from etsq.errors import UserError
from etsq.testbed.train import DEFAULT, SMALL, TrainConfig

POLICY_SPEC = "testbed"
PRM_SPEC = "testbed-prm"
SPECS = (POLICY_SPEC, PRM_SPEC)
PRM_FAMILY = "likelihood"
HASH_CHARS = 12
SOURCE_MODULES = ("arith.py", "tokenizer.py", "train.py")  # the training code the hash covers
MANIFEST = "build.json"
CONFIGS: dict[str, TrainConfig] = {"default": DEFAULT, "small": SMALL}

Stage = Callable[[str], None]


class TestbedError(UserError):
    """The testbed models cannot be built or found."""


@dataclass(frozen=True)
class TestbedPaths:
    """Where one build's checkpoints are."""

    root: Path
    shipped: bool = False

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def prm(self) -> Path:
        return self.root / "prm"

    @property
    def key(self) -> str:
        return self.root.name

    def model(self, spec: str) -> Path:
        """The checkpoint a model name (`testbed`, `testbed-prm`) stands for."""
        return self.prm if spec == PRM_SPEC else self.policy

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        return data


def source_digest() -> str:
    """SHA-256 over the training code's source files."""
    digest = hashlib.sha256()
    package = resources.files("etsq.testbed")
    for name in SOURCE_MODULES:
        digest.update(name.encode() + b"\0" + (package / name).read_bytes() + b"\0")
    return digest.hexdigest()


def build_key(seed: int = 0, config: TrainConfig = DEFAULT) -> str:
    """The 12-hex-digit name of a build: training code + seed + configuration."""
    spec = json.dumps({"code": source_digest(), "seed": seed, "config": config.to_dict()}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:HASH_CHARS]


def shipped_root() -> Path:
    return Path(str(resources.files("etsq") / "data" / "testbed"))


def shipped_paths() -> TestbedPaths | None:
    """The shipped default build, if its hash is the current code's."""
    root = shipped_root() / build_key()
    return TestbedPaths(root, shipped=True) if (root / MANIFEST).is_file() else None


def built_paths(home: Path, seed: int = 0, config: TrainConfig = DEFAULT) -> TestbedPaths:
    return TestbedPaths(Path(home) / "testbed" / build_key(seed, config))


def testbed_paths(home: Path) -> TestbedPaths:
    """The default build: the shipped copy when it matches the code, else the one built in `home`."""
    shipped = shipped_paths()
    if shipped is not None:
        return shipped
    built = built_paths(home)
    if built.root.is_dir():
        return built
    raise TestbedError(
        f"the testbed models for this version of etsq are not built (looked in {built.root}); "
        "run `etsq testbed build`"
    )


def build(
    home: Path,
    seed: int = 0,
    config: TrainConfig = DEFAULT,
    progress: Callable[[str], None] | None = None,
    on_stage: Stage | None = None,
) -> TestbedPaths:
    """Train the policy and PRM into `home/testbed/<hash>` unless that build exists already.

    `on_stage` is called with "policy", "prm" and "saved" as each part finishes (before the final
    move), so a test can interrupt a build at a known point.
    """
    paths = built_paths(home, seed, config)
    if paths.root.is_dir():
        return paths
    parent = _writable_parent(paths.root.parent)
    scratch = Path(tempfile.mkdtemp(prefix=f".{paths.key}-", dir=parent))
    try:
        _train_into(scratch, seed, config, progress or (lambda _: None), on_stage or (lambda _: None))
        try:
            os.replace(scratch, paths.root)
        except OSError:
            if not paths.root.is_dir():  # another build finished first: keep it
                raise
    except OSError as exc:
        raise TestbedError(f"cannot write the testbed build to {paths.root}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return paths


def _writable_parent(parent: Path) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TestbedError(f"cannot create {parent} for the testbed models: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TestbedError(f"cannot write the testbed models under {parent}: permission denied")
    return parent


def _train_into(
    root: Path, seed: int, config: TrainConfig, progress: Callable[[str], None], stage: Stage
) -> None:
    from etsq.testbed.tokenizer import build_tokenizer
    from etsq.testbed.train import seed_everything, train_policy, train_prm

    started = time.monotonic()
    seed_everything(seed, config.threads)
    tokenizer = build_tokenizer()
    policy = train_policy(config, tokenizer, seed, progress)
    policy_s = time.monotonic() - started
    stage("policy")
    prm = train_prm(config, policy, tokenizer, seed, progress)
    stage("prm")
    for name, model in (("policy", policy), ("prm", prm)):
        save_checkpoint(model, tokenizer, root / name)
    manifest = {
        "key": root.name.split("-")[0].lstrip("."),
        "seed": seed,
        "config": config.to_dict(),
        "prm_family": PRM_FAMILY,
        "policy_train_s": round(policy_s, 1),
        "total_train_s": round(time.monotonic() - started, 1),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    stage("saved")


def save_checkpoint(model: Any, tokenizer: Any, path: Path) -> None:
    """Model (float16 weights: half the size; loaders cast to float32 on a CPU) and tokenizer."""
    import torch

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float16).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    # The generic class name: transformers 4.x (and servers pinned to it) load it as well as 5.x.
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def ship(home: Path, progress: Callable[[str], None] | None = None) -> TestbedPaths:
    """Build the default testbed (or take it from `home`) and copy it into the package data,
    replacing any earlier shipped build (a developer step after changing the training code)."""
    built = build(home, progress=progress)
    target = shipped_root()
    if target.is_dir():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copytree(built.root, target / built.key)
    return TestbedPaths(target / built.key, shipped=True)


if __name__ == "__main__":  # python -m etsq.testbed.build HOME: rebuild and re-ship the default
    import sys

    shipped = ship(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()), print)
    print(shipped.root)
