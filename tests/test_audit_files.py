"""An audit run folder's files as a set (2026-12-07 review)."""

import pytest


def test_a_report_that_fails_to_render_leaves_the_last_run_s_files_as_they_were(tmp_path, monkeypatch):
    import moeguard.report.audit as report

    for name in ("results.json", "report.md", "report.html"):
        (tmp_path / name).write_text(f"old {name}")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "risk.png").write_bytes(b"old plot")
    monkeypatch.setattr(report, "make_plots", lambda doc, stages, folder: (folder / "risk.png").write_bytes(b"new") and [])

    def broken(*a, **k):
        raise RuntimeError("render")
    monkeypatch.setattr(report, "render_markdown", lambda doc: "new md")
    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        report.write_report({"x": 1}, tmp_path, {})
    # results.json was new beside the old report.md and report.html
    assert [(tmp_path / n).read_text() for n in ("results.json", "report.md", "report.html")] == \
        ["old results.json", "old report.md", "old report.html"]
    # and the plots the old report.md links by name are the old run's (they were replaced before the render)
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["risk.png"] and \
        (tmp_path / "plots" / "risk.png").read_bytes() == b"old plot"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plots")]   # no temporary left


def test_a_stage_left_swapped_out_by_a_killed_rerun_is_swept_at_the_next_start(tmp_path):
    from moeguard.audit.stages import StageStore

    left = tmp_path / "stages" / ".defense.old-4242"
    (left / "hardened").mkdir(parents=True)
    (left / "hardened" / "model.safetensors").write_bytes(b"x" * 64)
    kept = tmp_path / "stages" / "defense"
    kept.mkdir()
    StageStore(tmp_path)
    assert not left.exists() and kept.is_dir()


def test_a_library_scan_resumed_in_another_dtype_computes_its_parts_again(tmp_path, monkeypatch):
    """dtype was in neither the scan's settings nor its resume stamp: parts computed in bf16 were
    reused beside float32 ones (the CLI has no --dtype; the audit keys its folder by runtime)."""
    import torch

    import moeguard.scan.run as run_mod
    from moeguard.edge import resolve_model, resolve_tasks

    calls = []
    real_usage = run_mod.usage_and_criticality

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "usage_and_criticality", lambda *a, **k: (calls.append(1), real_usage(*a, **k))[1])
    monkeypatch.setattr(run_mod, "expert_effects", stop)
    handle, tasks = resolve_model(None), resolve_tasks(["arith-compare"])
    cfg = run_mod.ScanConfig(samples=4, contexts=1, candidates=2, chain=2)
    for dtype in (torch.bfloat16, torch.bfloat16, None):
        with pytest.raises(KeyboardInterrupt):
            run_mod.scan(handle, tasks, tmp_path / "scan", config=cfg, dtype=dtype)
    assert calls == [1, 1]   # the bf16 run resumed its usage part; the float32 one computed its own


def test_experts_kept_quantized_are_refused_by_the_scan_s_weight_statistics():
    """On a GPU transformers keeps FP8 weights as their raw values beside block scales: the scan's
    norms and spectra were computed on them, without the scales (on the CPU it dequantizes them)."""
    import torch

    from moeguard.errors import MoeguardError
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import load_model
    from moeguard.scan.weights import weight_stats

    model, _, _ = load_model(None, with_tokenizer=False)
    experts = MoEAdapter(model).layers[1].experts
    experts.gate_up_proj.data = experts.gate_up_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(MoeguardError, match="layer 1's experts are stored as float8_e4m3fn"):
        weight_stats(model, MoEAdapter(model))


@pytest.mark.parametrize("block", ["resumable_dir", "resumable_scratch", "lazy_scratch"])
def test_a_second_run_writing_the_same_output_is_one_line_and_keeps_the_first_s_steps(block, tmp_path):
    """Two traces (or studies) to one --out: the second emptied the first's kept steps under it."""
    import moeguard.io as io
    from moeguard.errors import MoeguardError

    out = tmp_path / "out"
    with getattr(io, block)(out) as partial:
        partial.mkdir(exist_ok=True)
        (partial / "step.npz").write_bytes(b"kept")
        with pytest.raises(MoeguardError, match=f"another moeguard run is writing {out}"):
            with getattr(io, block)(out):
                pass
        assert (partial / "step.npz").read_bytes() == b"kept"
    assert not (tmp_path / ".out.partial.lock").exists()
