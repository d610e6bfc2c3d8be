"""benchmarks/bench_gpu_targets.py without networks: the verdict of each target and the replicated fixture folder."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gt():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_gpu_targets")
    finally:
        sys.path.remove(str(BENCH))


def _result(device="cuda", dry_run=False, **parts):
    return {"device": device, "dry_run": dry_run, "parts": parts, "skipped": {}}


ENSEMBLE = {"warm_median_s": 4.0, "gpu_peak_alloc_mib": 13_000.0, "first_case_s": 9.0, "warm_s": [4.0]}
NVAUTO = {"best_bf16_cl3d": {"config": "bf16_cl3d_b4", "tflops": 210.0}}
COHORT = {"cases_per_hour_steady": 900.0, "cases_per_hour_end_to_end": 700.0, "cases": 8, "cases_done": 8}
AGREEMENT = {"ensemble_mask": {"voxels_differing": 12}, "ensemble_probability": {"max_abs_dp": 0.01}}


def test_gpu_values_are_judged_against_the_targets(gt):
    v = gt.verdicts(_result(ensemble=ENSEMBLE, nvauto=NVAUTO, cohort=COHORT, agreement=AGREEMENT))
    assert v["ensemble_warm_s_per_case"]["status"] == "met"
    assert v["peak_gpu_memory_gib"]["status"] == "not met"  # 12.7 GiB > 12
    assert v["peak_gpu_memory_gib"]["value"] == pytest.approx(12.7, abs=0.01)
    assert v["nvauto_tflops"]["status"] == "met"
    assert v["cohort_cases_per_hour"]["status"] == "not met" and v["cohort_cases_per_hour"]["end_to_end"] == 700.0
    assert v["agreement_with_fp32_cpu"]["status"] == "stated"
    assert v["agreement_with_fp32_cpu"]["value"] == {"ensemble_voxels_differing": 12, "ensemble_max_abs_dp": 0.01}


def test_dry_run_and_missing_parts_are_not_measured(gt):
    v = gt.verdicts(_result("cpu", True, ensemble=ENSEMBLE, nvauto=NVAUTO, cohort=COHORT, agreement=AGREEMENT))
    assert all(row["status"].startswith("not measured (dry run") for row in v.values())
    res = _result()
    res["skipped"]["cohort"] = "budget: 10 s left"
    v = gt.verdicts(res)
    assert v["cohort_cases_per_hour"]["status"] == "not measured (budget: 10 s left)"
    assert v["nvauto_tflops"]["status"].startswith("not measured")


def test_fixture_folder_replicates_the_first_network(gt, tmp_path):
    counts = {"seals": 3, "nvauto": 4, "resunet": 2, "swin": 2}
    root = gt.official_from_fixtures(tmp_path / "official", counts)
    w = root / "weights"
    folds = sorted((w / gt.be.SEALS_REL).glob("fold_*"))
    assert len(folds) == 3 and len({p.resolve() for p in folds}) == 1
    assert (w / gt.be.SEALS_REL / "plans.pkl").is_file()
    models = sorted((w / "NVAUTO" / "ts").glob("model*.ts"))
    assert len(models) == 4 and len({p.resolve() for p in models}) == 1
    for arch in ("resunet", "swin-factorizer"):
        ck = [w / gt.be.FACT_LOGS / f"fold{f}" / arch / gt.be.FACT_CKPT for f in range(2)]
        assert all(c.is_file() for c in ck) and ck[0].resolve() == ck[1].resolve()


def test_replication_is_read_from_the_official_files(gt, tmp_path):
    counts = {"seals": 2, "nvauto": 3, "resunet": 2, "swin": 2}
    root = gt.official_from_fixtures(tmp_path / "official", counts)
    assert gt.official_replication(root, counts) == {"seals": True, "nvauto": True, "factorizer": True}
    ts = root / "weights" / "NVAUTO" / "ts"
    (ts / "model2.ts").unlink()
    (ts / "model2.ts").write_bytes((ts / "model0.ts").read_bytes())  # a copy: same bytes, other inode
    assert gt.official_replication(root, counts)["nvauto"]
    (ts / "model2.ts").write_bytes(b"other")
    assert not gt.official_replication(root, counts)["nvauto"]


def test_store_summary(gt, tmp_path):
    folder = tmp_path / "weights" / "factorizer"
    folder.mkdir(parents=True)
    models = [{"file": f"{a}{k}.safetensors", "name": f"{a}{k}", "arch": a} for a in ("r", "w") for k in range(2)]
    for m in models:
        (folder / m["file"]).write_bytes(b"1234")
    files = {m["file"]: "x" for m in models}
    (folder / "member.json").write_text(json.dumps({"models": models, "files": files, "network": {"class": "N"}}))
    s = gt.store_summary(tmp_path)
    assert s["factorizer"]["archs"] == {"r": 2, "w": 2} and s["factorizer"]["bytes"] == 16
    assert "missing" in s["seals"]
