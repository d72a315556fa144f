"""An audit run folder's files as a set (2026-12-07 review)."""

import pytest


def test_a_report_that_fails_to_render_leaves_the_last_run_s_files_as_they_were(tmp_path, monkeypatch):
    import moeguard.report.audit as report

    for name in ("results.json", "report.md", "report.html"):
        (tmp_path / name).write_text(f"old {name}")
    monkeypatch.setattr(report, "make_plots", lambda doc, stages, folder: [])

    def broken(*a, **k):
        raise RuntimeError("render")
    monkeypatch.setattr(report, "render_markdown", lambda doc: "new md")
    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        report.write_report({"x": 1}, tmp_path, {})
    # results.json was new beside the old report.md and report.html
    assert [(tmp_path / n).read_text() for n in ("results.json", "report.md", "report.html")] == \
        ["old results.json", "old report.md", "old report.html"]


def test_a_stage_left_swapped_out_by_a_killed_rerun_is_swept_at_the_next_start(tmp_path):
    from moeguard.audit.stages import StageStore

    left = tmp_path / "stages" / ".defense.old-4242"
    (left / "hardened").mkdir(parents=True)
    (left / "hardened" / "model.safetensors").write_bytes(b"x" * 64)
    kept = tmp_path / "stages" / "defense"
    kept.mkdir()
    StageStore(tmp_path)
    assert not left.exists() and kept.is_dir()
