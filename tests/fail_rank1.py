"""A plug-in module that fails on rank 1 only (loaded with TOKENBENCH_PLUGINS by the distributed test)."""
import os

from bench.errors import BenchError

if os.environ.get("RANK") == "1":
    raise BenchError("rank 1 cannot read its data shard (simulated failure)")
