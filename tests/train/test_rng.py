"""capture_rng_state / restore_rng_state, the CUDA entries included (reached on the CPU by
patching what ``torch.cuda`` reports)."""
import logging
import random

import numpy as np
import pytest
import torch

from blockyard.train.rng import capture_rng_state, restore_rng_state


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))  # noqa: NPY002 (the global one)


def fake_cuda(monkeypatch, *, available=True, count=2):
    """Pretend to have ``count`` CUDA devices; returns the list of (state, device) set."""
    states = [torch.full((16,), i + 1, dtype=torch.uint8) for i in range(count)]
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append((state, device)))
    return states, set_calls


def test_round_trip_restores_python_numpy_and_torch_exactly():
    state = capture_rng_state()
    assert "cuda" not in state or torch.cuda.is_available()
    first = draws()
    draws()
    restore_rng_state(state)
    assert draws() == first


def test_cuda_states_are_captured_per_device_and_restored_to_their_device(monkeypatch):
    states, set_calls = fake_cuda(monkeypatch, count=2)
    state = capture_rng_state()
    assert len(state["cuda"]) == 2 and all(torch.equal(a, b) for a, b in zip(state["cuda"], states))
    restore_rng_state(state)
    assert [device for _, device in set_calls] == [0, 1]
    assert all(torch.equal(s, e) and s.dtype == torch.uint8 for (s, _), e in zip(set_calls, states))


def test_cuda_states_for_more_devices_than_this_process_sees_is_a_value_error(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    state = capture_rng_state()
    _, set_calls = fake_cuda(monkeypatch, count=1)
    torch.rand(3)  # move the CPU stream away from the captured state
    after = torch.get_rng_state()
    with pytest.raises(ValueError, match="CUDA states for 2 devices, this process sees 1"):
        restore_rng_state(state)
    assert set_calls == []  # no device was half restored
    assert torch.equal(torch.get_rng_state(), after)  # nor the CPU generators: checked before anything


def test_cuda_states_without_cuda_warn_and_restore_the_rest(monkeypatch, caplog):
    fake_cuda(monkeypatch, count=1)
    state = capture_rng_state()
    first = draws()
    _, set_calls = fake_cuda(monkeypatch, available=False, count=0)
    with caplog.at_level(logging.WARNING, logger="blockyard.train.rng"):
        restore_rng_state(state)
    assert any("CUDA generator states but CUDA is not available" in r.getMessage() for r in caplog.records)
    assert set_calls == []
    assert draws() == first  # the CPU generators are restored all the same
