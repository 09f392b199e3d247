"""The README's run command, offline: ``python -m fiftyone_sdcorr demo --tiny --no-app``."""

import os
import subprocess
import sys

import fiftyone as fo


def test_demo_tiny_runs_end_to_end(tmp_path):
    name = f"sdcorr-demo-test-{os.getpid()}"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fiftyone_sdcorr", "demo", "--tiny", "--no-app", "--dataset", name,
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "pipeline check; numbers are meaningless" in out
    assert "PCK" in out
    # the demo's dataset: 1 annotated reference, 4 transformed copies with ground truth,
    # 2 unrelated photos; every target got predictions and the evaluation run exists
    ds = fo.load_dataset(name)
    try:
        assert len(ds) == 7
        assert ds.match_tags("reference").count("keypoints.keypoints") == 1
        assert ds.match_tags("target").count("predicted") == 6
        assert ds.exists("sdcorr_embedding").count() == 7
        assert "demo_pck" in ds.list_evaluations()
        res = ds.load_evaluation_results("demo_pck")
        assert "0.1" in res.report_str() or "0.10" in res.report_str()
    finally:
        ds.delete()
