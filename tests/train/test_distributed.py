"""Two CPU processes (torchrun, gloo) training with AccelerateCB end with identical parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_ddpm_dist.py"


def test_torchrun_two_processes_keep_parameters_in_sync(tmp_path):
    out = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))
    }
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--steps",
        "3",
        "--bs",
        "4",
        "--size",
        "8",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 for r in ranks), ranks
    assert all(r["distributed_type"].endswith("MULTI_CPU") and r["steps"] == 3 for r in ranks)
    # each rank saw its own shard (and was seeded differently) ...
    assert ranks[0]["first_batch_sha256"] != ranks[1]["first_batch_sha256"]
    # ... yet gradient averaging kept the weights bit-identical
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert "NOT synchronised" not in log
