"""One record per backend: every fact about a backend is read off `BACKENDS`, and a run stores exactly
what it stored before the records existed (its identity hashes these dicts)."""

from __future__ import annotations

import json

import pytest

from cli.main import cli as etsq_group
from etsq.errors import ConfigError
from etsq.models.backends import BACKEND_NAMES, BACKENDS, REMOTE_BACKENDS, get_backend
from etsq.models.config import ModelConfig
from tests.helpers import cli

# The stored model configs as main stored them before the records (f7b29b6): a change here changes
# every run's identity.  (`local` named smollm2, then the default; the default is now the testbed's.)
STORED = {
    "local": '{"backend": "local", "policy": "smollm2", "prm": "smollm2", "prm_family": "judge", '
    '"embedding": null, "prm_revision": 2}',
    "sim": '{"backend": "sim", "synthetic": true, "policy": "sim", "prm": "sim", "sim_latency_s": 0.0, '
    '"sim_answer_every": 4, "embedding": null}',
    "sglang": '{"backend": "sglang", "policy_url": "http://h:1", "prm_url": "http://h:1", "policy": null, '
    '"prm": null, "prm_family": "judge", "prm_api": "logprob", "embedding": null, "prm_revision": 2}',
    "openai": '{"backend": "openai", "policy_url": "http://h:1", "prm_url": "http://h:1", "policy": null, '
    '"prm": null, "prm_family": "judge", "prm_api": "logprob", "embedding": null, "prm_revision": 2}',
}


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_a_backend_stores_what_it_stored_before(name: str) -> None:
    options = {"policy_url": "http://h:1"} if get_backend(name).remote else {}
    if name == "local":
        options["policy"] = "smollm2"
    assert json.dumps(ModelConfig.create(name, **options).to_dict()) == STORED[name]


def test_the_default_local_models_are_the_testbed_pair_with_its_prm_family() -> None:
    assert ModelConfig.create("local").to_dict() == {
        "backend": "local", "policy": "testbed", "prm": "testbed-prm", "prm_family": "likelihood",
        "embedding": None,
    }  # fmt: skip
    # A family named on the command line wins; a named policy scores with itself, as before.
    assert ModelConfig.create("local", prm_family="judge").prm_family == "judge"
    assert ModelConfig.create("local", policy="/m").to_dict()["prm"] == "/m"


def test_the_names_remote_ones_and_help_come_from_the_records() -> None:
    assert tuple(BACKENDS) == BACKEND_NAMES and set(STORED) == set(BACKENDS)
    assert tuple(b.name for b in BACKENDS.values() if b.remote) == REMOTE_BACKENDS
    submit = " ".join(cli("submit", "--help").stdout.split())
    for backend in BACKENDS.values():
        assert f"{backend.name}: {' '.join(backend.help.split())}" in submit
    worker = " ".join(cli("worker", "--help").stdout.split())
    assert f"--backend [{'|'.join(REMOTE_BACKENDS)}]" in worker
    assert "ETSQ_BACKEND" not in " ".join(etsq_group.help or "")


def test_urls_and_prm_apis_are_checked_against_the_record() -> None:
    for backend in BACKENDS.values():
        if not backend.remote:
            with pytest.raises(ConfigError, match="need --backend sglang or --backend openai"):
                ModelConfig.create(backend.name, policy_url="http://h:1")
        for api in ("logprob", "fork"):
            urls = {"policy_url": "http://h:1"} if backend.remote else {}
            if not backend.remote or api in backend.prm_apis:
                ModelConfig.create(backend.name, prm_api=api, **urls)
            else:
                with pytest.raises(ConfigError, match=f"--prm-api {api} .* use --backend sglang"):
                    ModelConfig.create(backend.name, prm_api=api, **urls)
