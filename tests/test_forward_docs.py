"""``help()`` of every exported block shows what its ``forward`` takes and returns.

A ``forward`` without a docstring makes ``help(Block)`` print torch's generic "Define the
computation performed at every call" text (or that of a torch base class), which says nothing
about the block's inputs, shapes or outputs.
"""
from __future__ import annotations

import inspect
import pydoc
import re

import pytest
import torch
from torch import nn

import blockyard.blocks as blocks
import blockyard.losses as losses


def _exported_modules() -> list[type[nn.Module]]:
    found = []
    for package in (blocks, losses):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj not in found:
                found.append(obj)
    return found


MODULES = _exported_modules()
# torch's own forward texts (nn.Module's "Define the computation..." and those of the torch
# classes our blocks subclass): a forward documented only by these tells a user nothing
TORCH_DOCS = {inspect.getdoc(base.forward) for cls in MODULES for base in cls.__mro__
              if base.__module__.startswith("torch.") and "forward" in vars(base)} - {None}


def test_the_scan_sees_the_blocks():
    names = {cls.__name__ for cls in MODULES}
    assert {"UNet", "GRN", "LayerNorm2d", "Attention", "DDPMScheduler", "MixtureOfExperts"} <= names
    assert len(MODULES) >= 30
    assert inspect.getdoc(nn.Module.forward) in TORCH_DOCS and inspect.getdoc(nn.LayerNorm.forward) in TORCH_DOCS


@pytest.mark.parametrize("cls", MODULES, ids=[c.__name__ for c in MODULES])
def test_forward_has_its_own_docstring_naming_inputs_and_result(cls):
    owner = next(base for base in cls.__mro__ if "forward" in vars(base))
    assert owner.__module__.startswith("blockyard."), f"{cls.__name__}.forward is torch's {owner.__name__}.forward"
    doc = inspect.getdoc(cls.forward)
    assert doc and doc not in TORCH_DOCS, f"{cls.__name__}.forward has no docstring of its own"
    params = [p.name for p in inspect.signature(cls.forward).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [p for p in params if not re.search(rf"^\s*{p}:", doc, flags=re.MULTILINE)]
    assert not missing, f"{cls.__name__}.forward's docstring does not describe {missing}"
    assert re.search(r"^(Returns|Raises):$", doc, flags=re.MULTILINE), f"{cls.__name__}.forward: no Returns"


@pytest.mark.parametrize("cls", [blocks.UNet, blocks.GRN, blocks.LayerNorm2d], ids=lambda c: c.__name__)
def test_help_text_shows_the_forward_docstring(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    forward_part = text[text.index("forward(self"):]
    assert inspect.getdoc(cls.forward).splitlines()[0] in forward_part
    assert "Define the computation performed at every call" not in text


def test_scheduler_call_names_its_methods():
    with pytest.raises(TypeError, match=r"use add_noise\(x0, noise, t\), step\(eps, t, x_t\)"):
        blocks.DDPMScheduler(num_steps=10)(torch.zeros(1, 2), 3)
