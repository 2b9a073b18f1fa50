"""Model configuration: which backend runs a run's policy and PRM, and how to reach them.

A `ModelConfig` is frozen and validates itself when built, so a run never stores a configuration
that a worker would refuse.  `to_dict()` is the `models` part of a run's stored config (and of its
hash): each backend keeps only the fields it uses, so that an irrelevant option cannot split one
configuration into two runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from etsq import validation
from etsq.errors import ConfigError, ModelError
from etsq.models.backends import (
    BACKEND_NAMES,
    MODEL_PRM_FAMILIES,
    PRM_APIS,
    REMOTE_BACKENDS,
    Backend,
    get_backend,
    remote_choices,
)
from etsq.models.prm_families import get_family

# Re-exported: the backends' names, the remote ones and the PRM APIs are read off their records.
__all__ = ["BACKEND_NAMES", "PRM_APIS", "REMOTE_BACKENDS", "ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """The models of a run.  Build with `ModelConfig.create` to get each backend's defaults."""

    backend: str = "local"
    policy: str | None = None  # local: model spec; servers: where the chat template comes from
    prm: str | None = None
    prm_family: str = "judge"
    embedding: str | None = None  # ETS clusters' sentence-embedding model (None: the default)
    policy_url: str | None = None
    prm_url: str | None = None
    prm_api: str = "logprob"
    sim_latency_s: float = 0.0
    sim_answer_every: int = 4
    # The PRM family's prompt revision the run is scored with; stored (so part of the run's identity)
    # once a family's prompt changed, so a run is never scored with two prompts.  None: revision 1.
    prm_revision: int | None = None

    def __post_init__(self) -> None:
        """Check every field (etsq.validation): names, server URLs, the sim backend's numbers."""
        validation.choice("backend", self.backend, BACKEND_NAMES)
        validation.text("prm_family", self.prm_family, max_chars=64)
        get_family(self.prm_family)  # raises ConfigError for an unknown family
        validation.choice("PRM api", self.prm_api, PRM_APIS)
        for name in ("policy", "prm", "embedding"):
            validation.text(name, getattr(self, name), optional=True)
        for name in ("policy_url", "prm_url"):
            validation.server_url(name, getattr(self, name))
        if self.prm_revision is not None:
            object.__setattr__(self, "prm_revision", validation.number("prm_revision", self.prm_revision))
        for name in ("sim_latency_s", "sim_answer_every"):
            object.__setattr__(self, name, validation.number(name, getattr(self, name)))
        if self.is_remote:
            self._check_remote()
        elif self.policy_url or self.prm_url:
            raise ConfigError(f"--policy-url/--prm-url need {remote_choices()}, not {self.backend}")

    def _check_remote(self) -> None:
        if self.prm_api not in self.kind.prm_apis:
            serve = " or ".join(
                f"--backend {b}" for b in REMOTE_BACKENDS if self.prm_api in get_backend(b).prm_apis
            )
            raise ConfigError(
                f"--prm-api {self.prm_api} is not what {self.backend} servers answer; use {serve}"
            )

    @classmethod
    def create(cls, backend: str = "local", **options: Any) -> ModelConfig:
        """A configuration with the backend's defaults filled in (what submit and sweeps store)."""
        allowed = {f.name for f in fields(cls)} - {"prm_revision"}
        unknown = set(options) - allowed - {"prm_revision"}
        if unknown:
            raise ConfigError(
                f"unknown model options {', '.join(sorted(unknown))}; allowed: "
                f"{', '.join(sorted({'backend', *allowed}))}"
            )
        cfg = cls(backend=backend, **{k: v for k, v in options.items() if v is not None})
        kind = cfg.kind
        if kind.synthetic:
            return replace(cfg, policy=kind.name, prm=kind.name)
        policy = cfg.policy or kind.default_policy
        # A run that names its policy but no PRM scores with the policy model (an instruct model as judge).
        default_prm = kind.default_prm if not cfg.policy else None
        cfg = replace(cfg, policy=policy, prm=cfg.prm or default_prm or policy)
        if options.get("prm_family") is None:
            cfg = replace(cfg, prm_family=MODEL_PRM_FAMILIES.get(str(cfg.prm), cfg.prm_family))
        cfg = replace(cfg, prm_revision=get_family(cfg.prm_family).revision)
        return replace(cfg, prm_url=cfg.prm_url or cfg.policy_url) if kind.remote else cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The configuration a run stored (unknown keys, e.g. `synthetic`, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})

    def to_dict(self) -> dict[str, Any]:
        values = {**{f.name: getattr(self, f.name) for f in fields(self)}, "synthetic": True}
        stored = {key: values[key] for key in self.kind.stored}
        if (self.prm_revision or 1) > 1:  # revision 1 is what runs stored before revisions existed
            stored["prm_revision"] = self.prm_revision
        return stored

    def check_prm_revision(self) -> None:
        """Refuse to go on scoring a run with a PRM prompt other than the one it was scored with."""
        if self.is_synthetic:
            return
        stored, current = self.prm_revision or 1, get_family(self.prm_family).revision
        if stored != current:
            raise ModelError(
                f"this run was scored with revision {stored} of the {self.prm_family!r} PRM prompt and this "
                f"etsq writes revision {current}; its finished problems stay gradable, and submitting the "
                "configuration again makes a new run"
            )

    @property
    def kind(self) -> Backend:
        """The backend's record (`etsq.models.backends.BACKENDS`)."""
        return get_backend(self.backend)

    @property
    def is_remote(self) -> bool:
        return self.kind.remote

    @property
    def is_synthetic(self) -> bool:
        return self.kind.synthetic

    def with_servers(self, policy_url: str | None, prm_url: str | None) -> ModelConfig:
        """Fill a run's unset server URLs from a worker's defaults (`etsq worker --policy-url ...`)."""
        if not self.is_remote:
            return self
        policy = self.policy_url or policy_url
        if not policy:
            raise ConfigError(
                f"backend {self.backend!r} needs a policy server URL (--policy-url on submit or worker)"
            )
        return replace(self, policy_url=policy, prm_url=self.prm_url or prm_url or policy)

    def label(self, role: str) -> str:
        """What a run records as its policy/PRM model: the model spec, or for servers backend + URL."""
        if not self.is_remote:
            return str(getattr(self, role))
        return f"{self.backend}:{getattr(self, f'{role}_url') or '(worker default)'}"

    def describe_servers(self) -> str:
        return f"{self.backend} policy {self.policy_url}, PRM {self.prm_url}"
