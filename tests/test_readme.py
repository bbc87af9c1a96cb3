"""The README's short tour runs as written and prints and returns what its comments claim.

The tour is the first ``python`` code block of README.md, run verbatim. Its claims are read from
the README's own comments, so editing the tour without keeping them true fails here:

- ``print(...)  # <output>: why``: the printed line is ``<output>`` (``...`` matches anything, as in
  doctest's ELLIPSIS);
- ``logits = ...  # (2, 4, 20, 28): ...``: the shape of that variable;
- ``loss.loss.backward()  # float32 even under bf16 autocast``: checked by running the whole tour
  under bfloat16 autocast too;
- the sentence after the block: ``net(x, cond)`` does not depend on ``cond`` until training moves
  the identity-initialised gates.
"""
from __future__ import annotations

import contextlib
import doctest
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def tour() -> str:
    text = README.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def claimed_prints(code: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^print\(.*\)\s+#\s*(.+?): ", code, flags=re.MULTILINE)]


def claimed_shapes(code: str) -> dict[str, tuple[int, ...]]:
    found = re.finditer(r"^(\w+) = .*#\s*\((\d+(?:, \d+)*)\)", code, flags=re.MULTILINE)
    return {m.group(1): tuple(int(v) for v in m.group(2).split(", ")) for m in found}


def run(code: str, autocast: bool = False) -> tuple[dict, list[str]]:
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    torch.manual_seed(0)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), context:
        exec(compile(code, str(README), "exec"), namespace)
    return namespace, out.getvalue().splitlines()


def test_the_tour_is_found_and_makes_claims():
    code = tour()
    assert "from blockyard" in code
    assert claimed_prints(code), "the tour claims no printed output"
    assert "logits" in claimed_shapes(code)


def test_the_tour_prints_what_it_claims():
    code = tour()
    _, printed = run(code)
    wanted = claimed_prints(code)
    assert len(printed) == len(wanted), (printed, wanted)
    checker = doctest.OutputChecker()
    for want, got in zip(wanted, printed):
        ok = checker.check_output(want + "\n", got + "\n", doctest.ELLIPSIS)
        assert ok, f"README claims {want!r}, printed {got!r}"


def test_the_tour_returns_the_claimed_shapes_and_cond_does_not_matter_at_init():
    code = tour()
    namespace, _ = run(code)
    for name, shape in claimed_shapes(code).items():
        assert tuple(namespace[name].shape) == shape, name
    net, x, cond = namespace["net"], namespace["x"], namespace["cond"]
    net.eval()  # the bottleneck dropout aside, FiLM and attention gates are the identity at init
    with torch.no_grad():
        torch.testing.assert_close(net(x, cond), net(x, torch.randn_like(cond) * 10), rtol=0, atol=0)
    # the README's "until training moves them": one step on the FiLM projections, and cond matters
    film = next(m for m in net.modules() if type(m).__name__ == "FiLM")
    with torch.no_grad():
        film.proj.weight.normal_()
        assert not torch.equal(net(x, cond), net(x, torch.randn_like(cond) * 10))


def test_the_loss_is_float32_under_bf16_autocast():
    namespace, _ = run(tour(), autocast=True)
    assert namespace["logits"].dtype == torch.bfloat16  # autocast was on for the network
    assert namespace["loss"].loss.dtype == torch.float32
    assert namespace["x"].grad is None and all(p.grad is not None for p in namespace["head"].parameters())
