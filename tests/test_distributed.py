"""`torchrun --nproc_per_node=2 -m palette analyze|allocate`: probe samples sharded over two CPU
processes (gloo) give the single process's files, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from palette.cli import main
from palette.models.zoo import build


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet") / "unet"
    build("sd15-unet", tiny=True).save_pretrained(path)
    return path


def torchrun(argv: list[str], tmp: Path) -> None:
    """`torchrun --standalone --nproc_per_node=2 -m palette ...`, one thread each (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "palette", *argv]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}  # the checkout under test, as in this process
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_give_the_single_process_sensitivity_and_recipe(unet_dir, tmp_path) -> None:
    probe = ["--model", str(unet_dir), "--samples", "4", "--batch-size", "1", "--probes", "2",
             "--nbits", "2", "4", "-q"]
    analyze = ["analyze", *probe, "-o", str(tmp_path / "sens.json")]
    allocate = ["allocate", *probe, "--budget-bits", "3", "--plot", "none", "-o", str(tmp_path / "recipe.json")]
    torchrun(analyze, tmp_path)
    torchrun(allocate, tmp_path)
    sharded = {name: (tmp_path / name).read_bytes() for name in ("sens.json", "recipe.json")}
    assert main(analyze) == 0 and main(allocate) == 0  # one process, in this one
    for name, data in sharded.items():
        assert (tmp_path / name).read_bytes() == data, name
