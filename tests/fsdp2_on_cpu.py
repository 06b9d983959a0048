"""Run a script or module under `accelerate launch` with FSDP2 on CPU processes (gloo), so the
FSDP2 launch config is tested without GPUs: accelerate runs FSDP only on accelerator
distributed types (a CPU run silently falls back to plain data parallel), though torch's
`fully_shard` itself works on CPU. This lifts that one gate; everything after it (wrapping,
sharded steps, checkpoints, the gathered state dict) is accelerate's and torch's own code.

usage: accelerate launch --config_file configs/accelerate/fsdp2.yaml tests/fsdp2_on_cpu.py \
           (-m MODULE | SCRIPT) ARGS...
"""

import functools
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


@functools.wraps(_init)
def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP  # as AcceleratorState does for GPUs
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    target, *rest = sys.argv[1:]
    if target == "-m":
        sys.argv = rest
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")
