"""What produced a run: resolved config, git commit (dirty flag and diff), package versions, machine.

Written into the run directory at start (as modded-nanogpt logs its own source).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ["torch", "deepspeed", "hydra-core", "omegaconf", "numpy", "datasets", "tokenizers", "safetensors",
            "wandb", "transformer-engine", "moeforge"]
REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(status.strip()) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_facts() -> dict:
    facts = {"python": sys.version.split()[0], "platform": platform.platform(), "hostname": platform.node(),
             "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


def write(run_dir: Path, resolved_config_yaml: str, extra: dict | None = None) -> None:
    """config.yaml, provenance.json and (when the tree is dirty) git.diff into run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(resolved_config_yaml)
    git = git_state()
    if git["dirty"]:
        (run_dir / "git.diff").write_text(_git("diff", "HEAD") or "")
    record = {"git": git, "packages": package_versions(), "machine": machine_facts(), "argv": sys.argv,
              **(extra or {})}
    (run_dir / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
