"""Model specs to loaded models: "smollm2", "testbed"/"testbed-prm", a local directory or a hub id.

`load_local_models` keeps a process-wide cache keyed by resolved path, so a long-lived worker loads
each model once, and a policy and PRM naming the same model share one set of weights.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from etsq.errors import ModelError
from etsq.models.base import PRM, Policy
from etsq.models.config import ModelConfig
from etsq.models.prm_families import is_likelihood, is_reward_head
from etsq.models.smollm import ensure_smollm2
from etsq.settings import Settings

if TYPE_CHECKING:
    from etsq.models.local import LoadedModel

SMOLLM2_SPEC = "smollm2"
TESTBED_SPECS = ("testbed", "testbed-prm")  # etsq.testbed.build.SPECS

_loaded: dict[str, LoadedModel] = {}
_lock = threading.Lock()


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "owner/name"; these prefixes can only mean a filesystem path.
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def resolve_model_path(spec: str, home: Path) -> str:
    """Where to load `spec` from: the converted default, an existing directory, or a hub id as given."""
    if spec == SMOLLM2_SPEC:
        return str(ensure_smollm2(Path(home)))
    if spec in TESTBED_SPECS:  # the testbed's tiny arith models: shipped, or built by `etsq testbed build`
        from etsq.testbed.build import testbed_paths

        return str(testbed_paths(Path(home)).model(spec))
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if _looks_like_path(spec):
        raise ModelError(f"model directory {spec!r} does not exist")
    return spec


def load_model(path: str, threads: int | None = None) -> LoadedModel:
    """The loaded model at `path`, loading it on first use in this process."""
    from etsq.models.local import load_causal_lm

    with _lock:  # a second thread asking for the same model waits instead of loading a copy
        if path not in _loaded:
            _loaded[path] = load_causal_lm(path, threads)
        return _loaded[path]


def clear_cache() -> None:
    """Forget every loaded model (tests; freeing memory between runs)."""
    with _lock:
        _loaded.clear()


def load(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The backend loader (see etsq.models.backends): in-process models, each loaded once per process."""
    assert cfg.policy and cfg.prm, "ModelConfig.create names both models"
    return load_local_models(cfg.policy, cfg.prm, settings.home, cfg.prm_family, settings.torch_threads)


def load_local_models(
    policy_spec: str, prm_spec: str, home: Path, prm_family: str = "judge", threads: int | None = None
) -> tuple[Policy, PRM]:
    """An in-process policy and PRM; the same resolved path gives one shared model object.

    A reward-head PRM family (Qwen2.5-Math-PRM) loads its checkpoint as a body + label head
    (etsq.models.reward_head) instead of a causal LM.
    """
    from etsq.models.local import LocalLikelihoodPRM, LocalPolicy, LocalPRM

    policy_model = load_model(resolve_model_path(policy_spec, home), threads)
    prm_path = resolve_model_path(prm_spec, home)
    if is_reward_head(prm_family):
        from etsq.models.reward_head import load_reward_prm

        return LocalPolicy(policy_model, name=policy_spec), load_reward_prm(
            prm_path, prm_family, prm_spec, threads
        )
    prm_model = load_model(prm_path, threads)
    policy = LocalPolicy(policy_model, name=policy_spec)
    if is_likelihood(prm_family):
        return policy, LocalLikelihoodPRM(prm_model, prm_family, name=prm_spec)
    return policy, LocalPRM(prm_model, prm_family, name=prm_spec)
