"""`etsq testbed build`: train the testbed's tiny policy and PRM (etsq.testbed) on this machine."""

from __future__ import annotations

import os

import click

from cli.app import pass_settings, print_json
from etsq.settings import Settings


@click.group()
def testbed() -> None:
    """The testbed: an arithmetic task (dataset `arith`) with a tiny policy and PRM on which search helps.

    The default build ships with etsq; `build` trains it (or another seed) under ETSQ_HOME.

    \b
    Examples:
      etsq testbed build --json
      etsq submit arith --method rebase --width 16 --limit 20 --policy-model testbed \\
          --prm-model testbed-prm --prm-family likelihood --wait
    """


@testbed.command("build")
@click.option(
    "--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Training seed."
)
@click.option(
    "--small", is_flag=True, help="A tiny configuration that trains in seconds (tests, smoke checks)."
)
@click.option("--json", "as_json", is_flag=True, help="Print where the models are as JSON.")
@pass_settings
def build_command(settings: Settings, seed: int, small: bool, as_json: bool) -> None:
    """Train the policy and PRM into ETSQ_HOME/testbed/<hash> (instant when that build exists).

    The default configuration takes a few minutes on 2 CPU cores; the hash covers the training code,
    the seed and the configuration.

    \b
    Examples:
      etsq testbed build
      etsq testbed build --seed 1 --json
      etsq testbed build --small
    """
    # Idle OpenMP threads sleep instead of spinning: on a busy 2-core box spinning threads starve each
    # other (a training step measured 3.4 s spinning against 0.46 s sleeping at load 5).  OpenMP
    # reads it when torch loads, which happens below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from etsq.testbed.build import CONFIGS, PRM_FAMILY, build

    config = CONFIGS["small" if small else "default"]
    paths = build(settings.home, seed, config, progress=None if as_json else click.echo)
    info = {"key": paths.key, "policy": str(paths.policy), "prm": str(paths.prm), "prm_family": PRM_FAMILY}
    if as_json:
        print_json(info)
    else:
        click.echo(f"policy: {paths.policy}\nprm:    {paths.prm} (--prm-family {PRM_FAMILY})")
