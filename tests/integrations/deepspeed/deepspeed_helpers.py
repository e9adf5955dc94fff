"""Helpers of the DeepSpeed tests: configs, the entry's arguments, and running DeepSpeed in a
process of its own (deepspeed_worker.py) as a single-process world."""
import json
import os
import socket
import subprocess
import sys
from typing import Dict, Sequence

from fairseq_helpers import train_flags

from fastpatch.integrations.fairseq import USER_DIR

HERE = os.path.dirname(os.path.abspath(__file__))


def write_config(directory, config: Dict, name: str = "ds_config.json") -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def entry_args(data, save_dir, config_path, max_update=6, extra=(), cpu=True):
    """The flags of fairseq_helpers.train_flags with the ls_* modules (transformer_tiny, ls_adam,
    label-smoothed CE, dropout 0, fp32), plus fastpatch's user dir and the DeepSpeed config."""
    return train_flags(data, save_dir, max_update=max_update, ls_modules=True, cpu=cpu,
                       extra=list(extra)) + ["--user-dir", USER_DIR, "--deepspeed_config",
                                             str(config_path)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> Dict[str, str]:
    """A DeepSpeed world of one process, as the launcher would describe it."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1")
    return env


def run_worker(tmp_path, plan: Dict, timeout: int = 900, world_size: int = 1):
    """deepspeed_worker.py on ``plan`` in fresh processes, ``world_size`` ranks on this machine
    (as DeepSpeed's launcher starts them); returns rank 0's JSON result, or the list of every
    rank's when ``world_size > 1``."""
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = single_process_env()
    procs, outs = [], []
    for rank in range(world_size):
        outs.append(tmp_path / f"result-{rank}.json")
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "deepspeed_worker.py"),
                                       str(plan_path), str(outs[-1])], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rank, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"rank {rank}:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    results = [json.loads(out.read_text()) for out in outs]
    return results[0] if world_size == 1 else results


def losses(records: Sequence[Dict]):
    return [r["loss"] for r in records]
