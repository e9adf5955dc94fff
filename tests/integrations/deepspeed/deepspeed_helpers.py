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


def run_worker(tmp_path, plan: Dict, timeout: int = 900):
    """deepspeed_worker.py on ``plan`` in a fresh process; returns its JSON result."""
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "result.json"
    plan_path.write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "deepspeed_worker.py"),
                           str(plan_path), str(out_path)], env=single_process_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:])
    return json.loads(out_path.read_text())


def losses(records: Sequence[Dict]):
    return [r["loss"] for r in records]
