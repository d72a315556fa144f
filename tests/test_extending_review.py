"""From a read-only review of the extension points: a method may not take the sweep's baseline name;
every register_* helper takes overwrite=, as the duplicate-name error says; a study command's
--out may not be its model's folder whatever the command remembers."""

from __future__ import annotations

import shutil

import pytest

from moeguard.errors import MoeguardError
from moeguard.models.loading import EMBEDDED_MODEL_DIR


def test_an_attribution_method_named_random_is_refused_where_it_registers():
    """sweep.json's faithfulness holds the random-rankings baseline under 'random': a method of that
    name overwrote it, and the sweep's table failed on the missing baseline (a traceback)."""
    from moeguard.attribution.base import METHODS, register_method

    with pytest.raises(MoeguardError) as e:
        register_method("random", "uniform scores")(lambda ctx: None)
    assert e.value.message == ("attribution method name 'random' is reserved: the sweep's random-rankings baseline "
                               "is reported under it beside the methods")
    assert "random" not in METHODS


def test_every_register_helper_takes_overwrite_as_the_duplicate_error_says():
    from moeguard.attribution.base import METHODS, get_method, register_method
    from moeguard.defense.harden import DEFENSES, register_defense
    from moeguard.pruning.merging.base import MERGE_METHODS, register_merge
    from moeguard.realign.modes import MODES, register_mode
    from moeguard.realign.strategies.base import STRATEGIES, register_strategy

    old = get_method("gate")
    with pytest.raises(MoeguardError, match=r"pass overwrite=True \(to the register call\)"):
        register_method("gate", "again")(lambda ctx: None)
    try:
        register_method("gate", "replaced", overwrite=True)(lambda ctx: None)
        assert get_method("gate").description == "replaced"
    finally:
        METHODS.add("gate", old, overwrite=True)
    for reg, again in ((STRATEGIES, lambda s: register_strategy(s.name, description=s.description,
                                                                overwrite=True)(s.select)),
                       (MERGE_METHODS, lambda s: register_merge(s, overwrite=True)),
                       (DEFENSES, lambda s: register_defense(s, overwrite=True)),
                       (MODES, lambda s: register_mode(s, overwrite=True))):
        name = reg.names()[0]
        before = reg[name]
        try:
            again(before)   # accepted, where the helper raised TypeError on the keyword
        finally:
            reg.add(name, before, overwrite=True)


def test_a_study_command_refuses_out_in_its_models_folder(tmp_path, capsys):
    """_run_study guarded the task files only: a study command that did not pass the model itself (the
    docs' template) replaced the checkpoint with --overwrite."""
    from moeguard.cli.app import _run_study
    from moeguard.edge import resolve_model
    from moeguard.studies.builtin import STUDIES

    ckpt = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_MODEL_DIR, ckpt)
    handle = resolve_model(str(ckpt))
    with pytest.raises(MoeguardError) as e:
        _run_study(ckpt, True, {}, handle, STUDIES.get(STUDIES.names()[0]), None, lambda d, f: None)
    assert e.value.message == f"output {ckpt} is (or holds) the input {ckpt.resolve()}: writing it would replace the input"
    assert (ckpt / "config.json").exists()
