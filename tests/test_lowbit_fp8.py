"""What only fp8 states (state_dtype="fp8", docs/LOW_BIT_STATES.md) need: the map is the float8_e4m3fn values over
448, codes are real float8_e4m3fn tensors, and every kernel's encoder (integer steps, csrc/common/quant_format.h and
Triton's twin) rounds exactly as torch's float32 -> float8_e4m3fn conversion, ties and subnormals included. The
trajectory, state_dict, threshold and quality tests run fp8 with the other formats in test_lowbit_states.py."""

from __future__ import annotations

import pytest
import torch
from test_lowbit_states import Q8_BACKENDS

import fusedopt
from fusedopt import lowbit
from fusedopt.ops import optim_step

E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def test_map_is_e4m3_over_448():
    fmt = lowbit.FORMATS["fp8"]
    assert (fmt.block, fmt.codes_dtype, fmt.table_size) == (256, torch.float8_e4m3fn, 256)
    for signed in (True, False):  # one map for first and second moments
        table = lowbit.qmap(signed, "cpu", "fp8")
        nan = E4M3.isnan()
        assert nan.nonzero().reshape(-1).tolist() == [0x7F, 0xFF] and table[nan].isnan().all()
        assert torch.equal(table[~nan], (E4M3[~nan].double() / 448).float())
        assert table[0x7E] == 1.0 and table[0xFE] == -1.0  # the block's largest |value| reads back exactly


def _tie_probes() -> torch.Tensor:
    """Values x in [-1, 1] whose x * 448 (float32) lands on, or one float32 step beside, each midpoint between
    neighbouring e4m3 values (normals and subnormals), plus the e4m3 values themselves."""
    finite = E4M3[~E4M3.isnan()].unique()
    mids = (finite[1:].double() + finite[:-1].double()) / 2
    targets = torch.cat([mids, finite.double()]).float()
    near = torch.cat([targets, targets.nextafter(torch.tensor(1e9)), targets.nextafter(torch.tensor(-1e9))])
    x = (near.double() / 448).float()
    x = torch.cat([x, x.nextafter(torch.tensor(2.0)), x.nextafter(torch.tensor(-2.0))])
    return x[(x.abs() <= 1) & (x != 0)]


@pytest.mark.parametrize("backend", Q8_BACKENDS)  # (the torch backend's encoder is torch's conversion itself)
def test_kernel_encoder_rounds_as_torch(backend):
    _check_encoder(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernel_encoder_rounds_as_torch(backend):
    _check_encoder(backend, "cuda")


def _check_encoder(backend, device):
    """SGD with momentum 1, dampening 0 and lr 0 from zero codes stores the grad itself as the new buffer: its codes
    are the kernel's encoding of grad / absmax * 448. Every block holds 1.0, so absmax = 1 and x * 448 is the
    value rounded: the tie probes hit every rounding case, and the codes must be torch's conversion, bit for bit."""
    probes = _tie_probes()
    ties = (probes * 448).to(torch.float64)
    finite = E4M3[~E4M3.isnan()].unique().double()
    on_tie = torch.isin(ties, (finite[1:] + finite[:-1]) / 2)
    assert int(on_tie.sum()) >= 200, "the probes should land on many exact midpoints"
    rows = -(-probes.numel() // 255)
    grads = torch.nn.functional.pad(probes, (0, rows * 255 - probes.numel()), value=0.5).view(rows, 255)
    grads = torch.cat([torch.ones(rows, 1), grads], dim=1).reshape(-1)  # element 0 of each block: 1.0
    codes = torch.zeros(grads.numel(), dtype=torch.float8_e4m3fn)
    absmax = torch.zeros(rows)
    p = torch.zeros(grads.numel())
    hyper = {"momentum": 1.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    codes, absmax, p, g = codes.to(device), absmax.to(device), p.to(device), grads.to(device)
    optim_step.step_q8(fusedopt.optim.sgd.SPEC, [p], [g], [[codes]], [[absmax]], [], lr=0.0, hyper=hyper,
                       maximize=False, backend=backend, state_dtype="fp8")  # fmt: skip
    assert torch.equal(absmax.cpu(), torch.ones(rows))
    want = (grads * 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes.cpu().view(torch.uint8), want)


def test_codes_are_float8_values_of_the_scaled_state():
    """A user reads an fp8 state as codes.float() / 448 * absmax (per block of 256): within float32 rounding of
    the dequantized state, and state_dict holds the float8 codes as they are."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = fusedopt.AdamW([p], lr=1e-2, backend="cpu", state_dtype="fp8")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    codes, absmax = st["exp_avg_codes"], st["exp_avg_absmax"]
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == p.shape and absmax.shape == (20,)
    by_hand = (codes.float().reshape(-1, 256) / 448 * absmax[:, None]).reshape(p.shape)
    table = lowbit.qmap(True, "cpu", "fp8")
    torch.testing.assert_close(lowbit.dequantize(codes, absmax, table, state_dtype="fp8"), by_hand, rtol=3e-7, atol=0)
    sd = opt.state_dict()["state"][0]
    assert sd["exp_avg_codes"].dtype == torch.float8_e4m3fn and torch.equal(sd["exp_avg_codes"].view(torch.uint8),
                                                                            codes.view(torch.uint8))  # fmt: skip


def test_wrong_codes_dtype_is_refused():
    """uint8 codes passed as fp8 (or float8 codes as int8) are refused at each backend's boundary."""
    spec = fusedopt.optim.sgd.SPEC
    p, g = torch.zeros(300), torch.zeros(300)
    hyper = {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    for backend in [*Q8_BACKENDS, "torch"]:
        for state_dtype, dtype in (("fp8", torch.uint8), ("int8", torch.float8_e4m3fn)):
            codes = torch.zeros(300, dtype=dtype)
            want = "float8_e4m3fn" if state_dtype == "fp8" else "uint8"
            with pytest.raises(RuntimeError, match=rf"codes must be a contiguous torch.{want} tensor"):
                optim_step.step_q8(spec, [p], [g], [[codes]], [[torch.zeros(2)]], [], lr=0.1, hyper=hyper,
                                   maximize=False, backend=backend, state_dtype=state_dtype)  # fmt: skip
