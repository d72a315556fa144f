"""The one place hooks are attached (models/hooks/registry.py) and the rule that keeps it one."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

import pytest
import torch
from torch import nn

from moeguard.models.hooks import Hooks

SRC = Path(__file__).resolve().parents[1] / "src" / "moeguard"
REGISTRY = "moeguard/models/hooks/registry.py"   # the one place
# every torch hook (module, tensor, global, backward, grad-accumulation), accelerate's hooks, a hook
# written into a module's hook dict, and assigning a forward or a method a patch replaces, however it
# is spelled (reading or deleting another library's hooks, as realign/offload.py does, is not attaching)
ATTACH = re.compile(r"register_\w*hook\w*\s*\(|add_hook_to_module\s*\(|_forward_(pre_)?hooks\s*\[[^\]]*\]\s*=(?!=)"
                    r"|\.(forward|_old_forward|reduce)\s*=(?!=)"
                    r"|setattr\(\s*[^,]+,\s*[\"'](forward|_old_forward|reduce)[\"']"
                    r"|__dict__\[\s*[\"'](forward|_old_forward|reduce)[\"']\s*\]\s*=(?!=)")
# not hooks: a permanent repair of a broken upstream class, whose accelerate wrapper must call the repaired
# forward for the model's life (models/upstream.py)
ALLOWED = {("moeguard/models/upstream.py", "module._old_forward = types.MethodType(fixed.forward, module)")}


def code_lines(path: Path) -> dict[int, str]:
    """Each line's code with comments and string literals (docstrings too) blanked."""
    lines = path.read_text().splitlines()
    keep = [list(line) for line in lines]
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                (r0, c0), (r1, c1) = tok.start, tok.end
                for r in range(r0, r1 + 1):
                    row = keep[r - 1]
                    lo, hi = (c0 if r == r0 else 0), (c1 if r == r1 else len(row))
                    if tok.type == tokenize.STRING and r == r0 and r == r1 and hi - lo <= 20:
                        continue   # a short literal may name an attribute (setattr(m, "forward", f)): kept
                    row[lo:hi] = " " * (hi - lo)
    return {n: "".join(row) for n, row in enumerate(keep, 1)}


def attaching_lines(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == REGISTRY:
            continue
        for n, code in code_lines(path).items():
            if ATTACH.search(code) and (rel, code.strip()) not in ALLOWED:
                out.append(f"{rel}:{n}: {code.strip()}")
    return out


def test_nothing_attaches_a_hook_outside_the_registry():
    assert attaching_lines(SRC) == [], "attach through moeguard.models.hooks.Hooks"


def test_the_rule_sees_each_way_of_attaching(tmp_path):
    # the scan must catch what it forbids: one file per way, and only code (not comments or docstrings)
    root = tmp_path / "moeguard"
    (root / "models" / "hooks").mkdir(parents=True)
    ways = ["m.register_forward_hook(f)", "m.register_forward_pre_hook(f, with_kwargs=True)",
            "m.register_full_backward_hook(f)", "m.register_full_backward_pre_hook(f)", "m.register_backward_hook(f)",
            "t.register_hook(f)", "p.register_post_accumulate_grad_hook(f)",
            "torch.nn.modules.module.register_module_forward_hook(f)", "add_hook_to_module(m, h)",
            "m._forward_hooks[0] = f", "m.forward = f", "m._old_forward = f", "block.reduce = r",
            "setattr(m, 'forward', f)", 'm.__dict__["forward"] = f']
    for i, way in enumerate(ways):
        (root / f"w{i:02d}.py").write_text(f"def g(m, t, p, f, r, h, block, torch):\n    {way}\n")
    (root / "fine.py").write_text('"""m.forward = f in a docstring"""\nif m.forward == f:  # m.register_hook(f)\n'
                                  '    pass\nself.reduce_sum(x)\nx = "m.register_forward_hook(f) as text, a long one"\n'
                                  'if m._forward_hooks[k] == f:\n    del m._forward_hooks[k]\n')
    (root / "models" / "hooks" / "registry.py").write_text("m.register_forward_hook(f)\n")   # the one place
    found = attaching_lines(root)
    assert [line.split(": ", 1)[1] for line in found] == ways
    assert not any("registry.py" in line or "fine.py" in line for line in found)


class Box(nn.Module):
    top_k = 2    # a class default, as some families keep it

    def forward(self, x):
        return x + 1


def test_hooks_attach_and_close_removes_them_in_reverse_order():
    box, seen, undone = Box(), [], []
    with Hooks() as hooks:
        hooks.on_input(box, lambda m, args: seen.append("in"))
        hooks.on_output(box, lambda m, args, out: seen.append(("out", float(out))))
        hooks.on_output(box, lambda m, args, kwargs, out: seen.append(sorted(kwargs)), with_kwargs=True)
        hooks.then(lambda: undone.append("first"))
        hooks.then(lambda: undone.append("second"))
        assert len(hooks) == 5 and len(box._forward_hooks) == 2 and len(box._forward_pre_hooks) == 1
        box(torch.tensor(1.0))
    assert seen == ["in", ("out", 2.0), []]
    assert undone == ["second", "first"]
    assert not box._forward_hooks and not box._forward_pre_hooks
    assert len(hooks) == 0


def test_patches_nest_and_come_off_to_the_original():
    box = Box()
    with Hooks() as hooks:
        hooks.replace_forward(box, lambda x: x * 10)
        inner = box.forward
        hooks.replace_forward(box, lambda x: inner(x) + 5)
        hooks.replace_method(box, "reduce", lambda x: x * 3)
        assert float(box(torch.tensor(1.0))) == 15.0 and box.reduce(2) == 6
    assert "forward" not in box.__dict__ and "reduce" not in box.__dict__
    assert float(box(torch.tensor(1.0))) == 2.0


def test_set_attribute_restores_an_instance_value_and_drops_a_class_default():
    box = Box()
    box.capacity = 7
    with Hooks() as hooks:
        hooks.set_attribute(box, "capacity", 3)
        hooks.set_attribute(box, "top_k", 1)
        assert (box.capacity, box.top_k) == (3, 1)
    assert box.capacity == 7
    assert "top_k" not in box.__dict__ and box.top_k == 2   # the class's again, not frozen on the instance


def test_set_attribute_restores_a_value_stored_outside_the_instance_dict():
    class Held(nn.Module):
        def __init__(self):
            super().__init__()
            self._k = 4
            self.register_buffer("scale", torch.ones(2))

        @property
        def k(self):
            return self._k

        @k.setter
        def k(self, value):
            self._k = value

    held = Held()
    with Hooks() as hooks:
        hooks.set_attribute(held, "k", 1)
        hooks.set_attribute(held, "scale", torch.zeros(2))
        assert held.k == 1 and float(held.scale.sum()) == 0
    assert held.k == 4 and float(held.scale.sum()) == 2 and "scale" in held._buffers


def test_an_object_that_owns_its_hooks_refuses_a_second_entry():
    hooks, box = Hooks(), Box()
    hooks.ensure_empty(box)
    hooks.on_output(box, lambda m, a, o: None)
    with pytest.raises(RuntimeError, match="Box is already entered"):
        hooks.ensure_empty(box)
    hooks.close()
    hooks.ensure_empty(box)


def test_an_error_inside_the_block_still_removes_everything():
    box = Box()
    with pytest.raises(RuntimeError, match="mid-forward"):
        with Hooks() as hooks:
            hooks.on_output(box, lambda m, a, o: None)
            hooks.replace_forward(box, lambda x: x)
            assert box._forward_hooks and "forward" in box.__dict__
            raise RuntimeError("mid-forward")
    assert not box._forward_hooks and "forward" not in box.__dict__


def test_close_runs_every_undo_when_one_fails_and_raises_the_first_error():
    box, undone = Box(), []
    hooks = Hooks()
    hooks.on_output(box, lambda m, a, o: None)

    def fails(msg):
        def undo():
            undone.append(msg)
            raise ValueError(msg)
        return undo
    hooks.then(fails("older"))
    hooks.then(fails("newer"))
    with pytest.raises(ValueError, match="newer"):   # last attached, first undone
        hooks.close()
    assert undone == ["newer", "older"]
    assert not box._forward_hooks                    # attached before both, still removed
    hooks.on_output(box, lambda m, a, o: None)       # reusable after close
    hooks.close()
    assert not box._forward_hooks
