import pytest
import torch
from torch import nn

from blockyard.train import (
    PRECISIONS,
    autocast,
    default_precision,
    make_grad_scaler,
    precision_dtype,
    scaler_step,
)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_autocast_runs_matmuls_in_the_precision_dtype(precision, dtype, device):
    layer = nn.Linear(4, 3)
    with autocast(device, precision):
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype
    assert layer.weight.dtype == torch.float32  # master weights untouched
    assert precision_dtype(precision) == dtype


def test_fp32_is_a_true_no_op_inside_an_enclosing_autocast():
    layer = nn.Linear(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("cpu", "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp64", "bf16-mixed", "16", "", None])
def test_unknown_precision_is_a_value_error(precision):
    with pytest.raises(ValueError, match="precision: expected one of"):
        autocast("cpu", precision)
    with pytest.raises(ValueError, match="precision: expected one of"):
        make_grad_scaler(precision, "cpu")


def test_bad_device_type_is_a_type_error():
    with pytest.raises(TypeError, match="device: expected"):
        autocast(0, "bf16")


def test_default_precision_is_fp32_on_cpu():
    assert default_precision("cpu") == "fp32"
    assert PRECISIONS == ("fp32", "bf16", "fp16")


# ---- the CUDA branches, reached on the CPU by patching what torch reports ---------------------


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, "bf16"), (False, "fp16")])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_default_precision_on_cuda(monkeypatch, bf16_supported, expected, device):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert default_precision(device) == expected
    assert default_precision("cpu") == "fp32"  # the device given decides, not what the machine has


@pytest.mark.parametrize("cuda", [True, False])
def test_make_grad_scaler_without_a_device_follows_cuda_availability(monkeypatch, cuda):
    built = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: built.append((device, enabled)))
    expected = "cuda" if cuda else "cpu"
    for precision in PRECISIONS:
        make_grad_scaler(precision)
    make_grad_scaler("fp16", "cpu")  # an explicit device wins over what is available
    make_grad_scaler("fp16", "cuda:1")
    assert built == [(expected, False), (expected, False), (expected, True), ("cpu", True), ("cuda", True)]


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scaler_is_a_no_op_without_fp16(precision):
    model, opt = _setup()
    scaler = make_grad_scaler(precision, "cpu")
    assert not scaler.is_enabled()
    loss = model(torch.randn(5, 3)).pow(2).mean()
    assert scaler.scale(loss) is loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert scaler_step(scaler, opt) is True
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    assert scaler.state_dict() == {}
    scaler.load_state_dict(make_grad_scaler("fp16", "cpu").state_dict())  # ignored, not an error


@pytest.mark.parametrize("optimizer", ["sgd", "adam-fused"])
def test_fp16_scaler_is_real_and_scaler_step_reports_a_skipped_step(optimizer):
    """A fused optimizer skips inside its own step (GradScaler passes found_inf), so a step hook fires anyway."""
    model, opt = _setup()
    if optimizer == "adam-fused":
        opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    scaler = make_grad_scaler("fp16", "cpu")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    scale0 = scaler.get_scale()

    scaler.scale(model(torch.randn(5, 3)).pow(2).mean()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler_step(scaler, opt) is True
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad()

    scaler.scale(model(torch.randn(5, 3)).pow(2).mean()).backward()
    model.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler_step(scaler, opt) is False
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == scale0 * 0.5  # update() ran and backed off


class _Exploding(torch.optim.SGD):
    def step(self, closure=None):
        raise FloatingPointError("boom")


def test_scaler_step_removes_its_hook_even_when_the_step_raises():
    model = nn.Linear(3, 1)
    opt = _Exploding(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(FloatingPointError, match="boom"):
        scaler_step(make_grad_scaler("fp32", "cpu"), opt)
    assert len(opt._optimizer_step_post_hooks) == 0


def test_fp16_scaler_state_round_trip():
    scaler = make_grad_scaler("fp16", "cpu")
    state = make_grad_scaler("fp16", "cpu").state_dict()
    state["scale"] = 1024.0
    scaler.load_state_dict(state)
    assert scaler.get_scale() == 1024.0
    with pytest.raises(RuntimeError, match="state dict is empty"):
        make_grad_scaler("fp16", "cpu").load_state_dict(make_grad_scaler("bf16", "cpu").state_dict())
