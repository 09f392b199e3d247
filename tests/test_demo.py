"""The README's run command, offline: ``python -m fiftyone_sdcorr demo --tiny --no-app``
(run once per test session by the ``demo_build`` fixture of tests/conftest.py)."""

import fiftyone as fo


def test_demo_tiny_runs_end_to_end(demo_build):
    out = demo_build.output
    assert demo_build.returncode == 0, out[-4000:]
    assert "pipeline check; numbers are meaningless" in out
    assert "PCK" in out
    # the demo's dataset: 1 annotated reference, 4 transformed copies with ground truth,
    # 2 unrelated photos; every target got predictions and the evaluation run exists
    ds = fo.load_dataset(demo_build.name)
    assert len(ds) == 7
    assert ds.match_tags("reference").count("keypoints.keypoints") == 1
    assert ds.match_tags("target").count("predicted") == 6
    assert ds.exists("sdcorr_embedding").count() == 7
    assert "demo_pck" in ds.list_evaluations()
    res = ds.load_evaluation_results("demo_pck")
    assert "0.1" in res.report_str() or "0.10" in res.report_str()
