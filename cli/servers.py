"""`etsq servers up / status / down`: a GPU's policy and PRM servers on a box without Docker."""

from __future__ import annotations

import shlex
from typing import Any

import click

from cli.app import pass_settings, print_json, table
from etsq.servers.launcher import ENGINES, START_TIMEOUT_S, STOP_TIMEOUT_S, LaunchRequest
from etsq.settings import Settings


@click.group()
def servers() -> None:
    """Model servers per GPU (SGLang or vLLM) for boxes without Docker.

    \b
    Examples:
      etsq servers up --gpu 0 --policy meta-llama/Llama-3.1-8B-Instruct \\
          --prm peiyi9979/math-shepherd-mistral-7b-prm
      etsq servers status
      etsq servers down --gpu 0
    """


@servers.command()
@click.option("--gpu", type=click.IntRange(min=0), required=True, help="The GPU both servers run on.")
@click.option("--policy", required=True, help="Policy model: a hub id or a local directory.")
@click.option("--prm", required=True, help="PRM model: a hub id or a local directory.")
@click.option(
    "--engine",
    type=click.Choice(sorted(ENGINES)),
    default="sglang",
    show_default=True,
    help="sglang (worker --backend sglang) or vllm (worker --backend openai).",
)
@click.option(
    "--port-base",
    type=click.IntRange(1, 65534),
    default=None,
    help="Policy on this port, PRM on the next [default: 30000 + 10 x GPU].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the servers listen on.")
@click.option(
    "--policy-args",
    default=None,
    help="Extra server flags for the policy [default: sglang --mem-fraction-static 0.45, "
    "vllm --gpu-memory-utilization 0.45].",
)
@click.option(
    "--prm-args",
    default=None,
    help="Extra server flags for the PRM [default: sglang --mem-fraction-static 0.7 (of what the "
    "policy left), vllm --gpu-memory-utilization 0.4].",
)
@click.option(
    "--engine-command",
    default=None,
    help="Program that starts a server, instead of 'python3 -m sglang.launch_server' / 'vllm serve' "
    "(an engine in another environment; tests use a stand-in).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=START_TIMEOUT_S,
    show_default=True,
    help="Seconds each server may take to answer /health.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@pass_settings
def up(settings: Settings, as_json: bool, **options: Any) -> None:
    """Start a GPU's policy and PRM servers, wait until both answer /health, print the worker command.

    The servers run in the background (they outlive this command), pinned with CUDA_VISIBLE_DEVICES,
    logging to $ETSQ_HOME/servers/gpuN/. The PRM starts once the policy is healthy.

    \b
    Examples:
      etsq servers up --gpu 0 --policy meta-llama/Llama-3.1-8B-Instruct \\
          --prm peiyi9979/math-shepherd-mistral-7b-prm
      etsq servers up --gpu 1 --engine vllm --policy Qwen/Qwen2.5-Math-7B-Instruct \\
          --prm Qwen/Qwen2.5-7B-Instruct          # a judge PRM: etsq submit --prm-family judge
      etsq servers up --gpu 2 --policy DIR --prm DIR \\
          --engine-command "/opt/sglang/bin/python -m sglang.launch_server"
    Then run the printed command, e.g.:
      etsq worker --gpu 0 --backend sglang --policy-url http://127.0.0.1:30000 --prm-url http://127.0.0.1:30001
    """
    from etsq.servers.launcher import up as start_servers

    record = start_servers(settings, LaunchRequest(**options), lambda line: click.echo(line, err=True))
    if as_json:
        print_json(record.to_json())
    else:
        click.echo(shlex.join(record.worker_command))


@servers.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of servers.")
@pass_settings
def status(settings: Settings, as_json: bool) -> None:
    """Show the recorded servers: process alive, /health answering.

    \b
    Examples:
      etsq servers status
      etsq servers status --json
    """
    from etsq.servers.launcher import status as server_status

    rows = server_status(settings)
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo("no servers are recorded (etsq servers up starts them)")
    else:
        table(rows, ["gpu", "role", "engine", "model", "url", "pid", "alive", "healthy", "log"])


@servers.command()
@click.option(
    "--gpu", type=click.IntRange(min=0), default=None, help="Only this GPU's servers [default: all]."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=STOP_TIMEOUT_S,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL.",
)
@pass_settings
def down(settings: Settings, gpu: int | None, timeout_s: float) -> None:
    """Stop recorded servers (SIGTERM, then SIGKILL after --timeout) and drop their records.

    \b
    Examples:
      etsq servers down --gpu 0
      etsq servers down
    """
    from etsq.servers.launcher import down as stop_servers

    stopped = stop_servers(settings, gpu, timeout_s)
    for record in stopped:
        which = ", ".join(f"{s.role} (pid {s.pid})" for s in record.servers)
        done = "stopped" if record.this_boot else "dropped the record, from before a reboot, of"
        click.echo(f"GPU {record.gpu}: {done} {which}")
    if not stopped:
        click.echo("no servers are recorded")
