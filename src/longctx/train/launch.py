"""Running `longctx train` in several processes: the rule's command stays `longctx train`, and
the params say how many processes and which accelerate config; the command relaunches itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from longctx.config import TrainConfig
from longctx.errors import ConfigError


def launcher(cfg: TrainConfig, argv: list[str]) -> list[str] | None:
    """The command that runs `longctx <argv>` as `cfg.processes` processes, or None when this
    process trains itself (a single process, or one already started by a launcher)."""
    if "WORLD_SIZE" in os.environ or (cfg.processes == 1 and cfg.accelerate_config is None):
        return None
    module = ["-m", "longctx.cli", *argv]
    if cfg.accelerate_config is not None:
        if not Path(cfg.accelerate_config).is_file():
            raise ConfigError(f"train.accelerate_config: {cfg.accelerate_config} not found")
        # the params' count wins over the file's: one place says how many processes run
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                cfg.accelerate_config, "--num_processes", str(cfg.processes), *module]
    # plain data parallel: torchrun, which Accelerate reads (gloo on CPU, nccl on GPUs)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(cfg.processes), *module]
