"""Document-aware training computes the same in a pipeline with expert and data parallelism as in one process.

A corpus of short documents (several per 64-token row) trained 12 steps with
`data.document_aware=true` and MTP: pp=2 × dp=2 × ep=2 (each block stage rebuilds the document
mask from the position ids that travel with the activations; the last stage masks MTP targets
across documents) against the single process. The mask's own correctness (a packed row equals
its documents run alone) is tests/unit/test_document_attention.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.data_helpers import generated_documents, prepare_dataset, write_jsonl
from tests.distributed.runs import ROOT, WORKER, launcher, worker_env

pytestmark = pytest.mark.slow
STEPS = 12
DOCS = ["data.document_aware=true", "parity.mtp=1"]


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    work = tmp_path_factory.mktemp("short_docs")
    src = write_jsonl(work / "docs.jsonl", generated_documents(1500, seed=11, max_len=120))
    out = work / "prepared"
    prepare_dataset(out, input=str(src), tokenizer="byte", val_fraction=0.05)
    return out


def run(tmp_path, data, nproc: int, overrides: list[str], salt: int) -> dict:
    out = tmp_path / f"result{nproc}.json"
    cmd = launcher(nproc, salt) + [str(WORKER), str(out), str(data), str(STEPS), *DOCS, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())["mtp1"]


def test_pipeline_expert_data_parallel_matches_one_process(tmp_path, short_documents):
    ref = run(tmp_path, short_documents, 1, [], 101)
    got = run(tmp_path, short_documents, 4, ["parallel.pp=2", "parallel.ep=2"], 103)
    assert ref["steps"][-1]["loss"] < ref["steps"][0]["loss"] - 1.0  # it trains
    for step, (a, b) in enumerate(zip(got["steps"], ref["steps"]), start=1):
        for key in ("loss", "mtp_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (step, key, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * b["grad_norm"], (step, a, b)
