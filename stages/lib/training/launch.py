"""`python -m stages.train --config_file X` (dvc.yaml's `train` cmd): `accelerate launch --config_file X -m
stages.train` run in this process, so that a failed run ends with the worker's own one-line error.

`accelerate launch` answers a worker's exit status 1 with a `subprocess.CalledProcessError` traceback (one
process) or torch.distributed's `ChildFailedError` (DDP, FSDP), printed under the worker's `ERROR: ...` line.
Here either becomes this process's exit status and nothing more; the params were checked before any launch.
"""

from __future__ import annotations

import subprocess


def launch(config_file: str, module: str) -> int:
    """Run `module` under accelerate with `config_file`; the exit status of the run (0: done)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", config_file, "-m", module])
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    except Exception as e:  # torch.distributed's ChildFailedError: each rank has printed its error
        if type(e).__name__ != "ChildFailedError":
            raise
        return 1
    return 0
