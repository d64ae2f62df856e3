"""Block-wise quantized optimizer states for every spec-driven optimizer (`state_dtype="int8"`, `"int4"` or `"fp8"`,
docs/LOW_BIT_STATES.md).

A param whose GLOBAL size (a DTensor's full numel, so every rank decides alike) is at least MIN_QUANT_NUMEL keeps
each state `key` as `key_codes` (int8: uint8 of the param's shape; int4: uint8 packed two per byte,
(ceil(numel / 2),); fp8: float8_e4m3fn of the param's shape) and `key_absmax` (float32, one per block of 256 (int8,
fp8) or 128 (int4) elements); smaller params, and every param of a
group with state_dtype=None, keep torch's full-precision `key`. Loading a state_dict converts each state to what this
optimizer keeps for it (quantizes, dequantizes or changes the format), so full-precision state_dicts of torch.optim
load here and `to_full_precision_state_dict` gives one torch.optim loads. The states of FSDP2 (DTensor) params take
a world-size independent form in state_dicts (fusedopt/optim/_lowbit_shards.py).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from fusedopt import lowbit
from fusedopt.optim import _lowbit_shards as shards
from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor

_SUFFIXES = ("_codes", "_absmax")


def _is_q8_key(key) -> bool:
    return isinstance(key, str) and key.endswith(_SUFFIXES)


def _zeros_like_local(p: Tensor, dtype) -> Tensor:
    """Contiguous zeros of p's (global) shape as p is held: a DTensor for a DTensor param."""
    if hasattr(p, "_local_tensor"):
        return torch.zeros_like(p, dtype=dtype)
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


def _in_placement(p: Tensor, codes: Tensor, fmt) -> Tensor:
    """The codes of p's local shard as the state holds them: int8 and fp8 codes in p's placement (a DTensor for a
    DTensor param), int4's packed bytes as they are (a plain tensor)."""
    if fmt.bits != 8:
        return codes
    whole = _zeros_like_local(p, fmt.codes_dtype)
    local_tensor(whole).copy_(codes)
    return whole


class LowBitStateMixin(FusedOptimizerMixin):
    """The state side of state_dtype="int8" / "int4" / "fp8"; SpecOptimizerMixin steps a quantized bucket through
    fusedopt.ops.optim_step.step_q8."""

    SERVES_STATE_DTYPE = True  # LAMB, on the spec engine without an 8-bit path, sets it back

    def _follow_group_options(self, gi: int, group: dict) -> None:
        """A new or changed state_dtype is validated; a change between steps converts the states already made, as a
        load does (_convert_states): kept as they were, they were stepped in their old format, or refused by a
        kernel."""
        super()._follow_group_options(gi, group)
        if not self.SERVES_STATE_DTYPE:
            return
        state_dtype = group.get("state_dtype")
        if self._group_options.get((gi, "state_dtype"), "") == state_dtype:
            return
        state_dtype = group["state_dtype"] = lowbit.check_state_dtype(state_dtype)
        if state_dtype is not None and any(p.dtype == torch.float64 for p in group["params"]):
            raise ValueError(
                f"fusedopt.optim.{type(self).__name__}: state_dtype={state_dtype!r} does not support float64 params "
                "(low-bit states are for float32, bfloat16 and float16 params); put them in a param group with "
                "state_dtype=None"
            )
        if (gi, "state_dtype") in self._group_options:
            self._convert_states()
            self._bucket_cache.clear()
        self._group_options[gi, "state_dtype"] = state_dtype

    def _quantized_state(self, group: dict, p: Tensor) -> bool:
        return group.get("state_dtype") is not None and p.numel() >= lowbit.MIN_QUANT_NUMEL  # DTensor: global numel

    def _quantize_into(self, p: Tensor, state: dict, spec, value: Tensor, state_dtype: str) -> None:
        """state[key_codes], state[key_absmax] <- value (p's local shape), quantized with spec's map. int8 and fp8
        codes follow a DTensor param's placement; int4 codes are a plain tensor (a DTensor param's: its local shard's
        packed bytes)."""
        lp = local_tensor(p)
        if local_tensor(value).numel() != lp.numel():  # a loaded state of another size: quantize would not say
            raise ValueError(f"fusedopt.optim.{type(self).__name__}: state {spec.key!r} of shape {list(value.shape)} "
                             f"does not fit its param of shape {list(p.shape)}")  # fmt: skip
        c, a = lowbit.quantize(local_tensor(value).to(lp.device), lowbit.qmap(spec.signed, lp.device, state_dtype),
                               state_dtype)  # fmt: skip
        state[lowbit.codes_key(spec.key)] = _in_placement(p, c, lowbit.quant_format(state_dtype))
        state[lowbit.absmax_key(spec.key)] = a

    def _dequantize_from(self, p: Tensor, state: dict, spec, dtype: torch.dtype) -> Tensor:
        """Pops state[key_codes] and state[key_absmax] (either format) and returns the values in `dtype`, of p's
        local shape."""
        lp = local_tensor(p)
        stored = state.pop(lowbit.codes_key(spec.key))
        fmt = _runtime_format(p, stored)
        codes = local_tensor(stored).to(lp.device)
        absmax = state.pop(lowbit.absmax_key(spec.key)).to(lp.device)
        return lowbit.dequantize(codes, absmax, lowbit.qmap(spec.signed, lp.device, fmt), dtype, fmt, lp.shape)

    def _new_q8_state(self, group: dict, p: Tensor, spec, state: dict) -> None:
        """A new state is one constant (0, or the spec's fill): every block has the codes and absmax of one constant
        block, so one block is quantized and repeated (quantizing the whole buffer by the plain-torch definition
        took tens of seconds for a 7B-scale model's first step, and held the buffer in full precision). A DTensor
        param's blocks are its local shard's, as _quantize_into makes them."""
        state_dtype = group["state_dtype"]
        fmt = lowbit.quant_format(state_dtype)
        lp = local_tensor(p)
        fill = 0.0 if spec.fill is None else float(group[spec.fill])
        one = torch.full((fmt.block,), fill, dtype=self._full_precision_state_dtype(group, p), device=lp.device)
        c, a = lowbit.quantize(one, lowbit.qmap(spec.signed, lp.device, state_dtype), state_dtype)
        n = lp.numel()
        first = c.reshape(-1)[:1]  # a tensor, not a Python int: no host sync on a GPU's first step
        if fmt.bits == 8:
            codes = first.repeat(n).view(lp.shape)
        else:  # two codes per byte, element 2j in the high nibble; an odd tail's spare nibble is 0
            codes = first.repeat(-(-n // 2))
            if n % 2:
                codes[-1:].bitwise_and_(0xF0)
        state[lowbit.codes_key(spec.key)] = _in_placement(p, codes, fmt) if shards.is_dtensor(p) else codes
        state[lowbit.absmax_key(spec.key)] = a[:1].repeat(-(-n // fmt.block))

    def _q8_lists(self, group, bucket: Bucket, used: tuple) -> tuple:
        """The op's codes and absmax lists (an unused state's empty); a used state missing so far starts now."""
        codes, absmax = [], []
        for s, on in zip(self.SPEC.states, used):
            ck, ak = lowbit.codes_key(s.key), lowbit.absmax_key(s.key)
            if on and ck not in bucket.state_lists:
                for p in bucket.params:
                    if ck not in self.state[p]:
                        self._new_q8_state(group, p, s, self.state[p])
                bucket.state_lists[ck] = [local_tensor(self.state[p][ck]) for p in bucket.params]
                bucket.state_lists[ak] = [self.state[p][ak] for p in bucket.params]
                bucket.extra.pop("cpp_buckets", None)  # the C++-held lists predate these
            codes.append(bucket.state_lists[ck] if on else [])
            absmax.append(bucket.state_lists[ak] if on else [])
        return codes, absmax

    # --- state_dict ---------------------------------------------------------------------------------------------
    def _finish_state_dict(self, sd: dict) -> dict:
        """The low-bit states of DTensor (FSDP2) params in the world-size independent global form
        (fusedopt/optim/_lowbit_shards.py), and int4 codes one per element (of the param's shape) as that form has
        them, for every param. Collective under FSDP2 when such states exist: every rank calls state_dict(), as DCP's
        get_optimizer_state_dict does."""
        sd = super()._finish_state_dict(sd)
        ids = itertools.chain.from_iterable(g["params"] for g in sd["param_groups"])
        params = ((p, g) for g in self.param_groups for p in g["params"])
        for pid, (p, group) in zip(ids, params):
            st = sd["state"].get(pid)
            if not st or group.get("state_dtype") is None or not any(_is_q8_key(k) for k in st):
                continue
            fmt = lowbit.quant_format(group["state_dtype"])  # the run-time states are in the group's format
            dtensor = shards.is_dtensor(p)
            if not dtensor and fmt.bits == 8:
                continue  # int8 / fp8 codes of a plain param are the global form already
            st = sd["state"][pid] = dict(st)  # torch's state_dict shares the per-param dicts with self.state
            for s in self.SPEC.states:
                ck, ak = lowbit.codes_key(s.key), lowbit.absmax_key(s.key)
                if ck in st and dtensor:
                    st[ck], st[ak] = shards.to_global_form(p, st[ck], st[ak], s.signed, fmt)
                elif ck in st:  # int4: a code per element, of the param's shape
                    st[ck] = lowbit.unpack4(st[ck], p.numel()).to(torch.uint8).view(p.shape)
        return sd

    def _load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating-point param's state to the param's dtype: codes and absmax are set aside and
        # put back as they were (a DTensor param's from the global form). The optimizer's own state_dtype wins.
        own = [g.get("state_dtype") for g in self.param_groups]
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        pairs = list(zip(ids, params))
        kept, plain = {}, {}
        for pid, st in state_dict["state"].items():
            kept[pid] = {k: v for k, v in st.items() if _is_q8_key(k)}
            plain[pid] = {k: v for k, v in st.items() if not _is_q8_key(k)}
        super()._load_state_dict({**state_dict, "state": plain})
        for g, sd in zip(self.param_groups, own):
            g["state_dtype"] = sd
        for pid, p in pairs:  # in param order: the DTensor conversion is collective
            q = kept.get(pid)
            if q:
                self.state[p].update(self._runtime_q8_state(p, q))
        self._convert_states()
        self._bucket_cache.clear()

    def _runtime_q8_state(self, p: Tensor, q: dict) -> dict:
        """Loaded codes and absmax as this param's step keeps them. A corrupt state (a key without its pair, codes or
        absmax of a count no format has) is a ValueError here, not a kernel's error at the next step or a silent
        broadcast in a conversion."""
        _check_pairs(q, f"load_state_dict: the state of a param of shape {list(p.shape)}")
        dev = local_tensor(p).device
        if not shards.is_dtensor(p):  # an FSDP2 state_dict into a plain param: the whole tensors (collective)
            out = {k: (shards.full_tensor(v) if shards.is_dtensor(v) else v).to(dev).contiguous()  # as steps take
                   for k, v in sorted(q.items())}
            for ck in [k for k in out if k.endswith("_codes")]:
                ak = lowbit.absmax_key(ck[: -len("_codes")])
                codes, absmax = out[ck], out[ak]
                if codes.numel() == p.numel() and shards.global_format(codes, absmax, p.numel()).bits == 4:
                    out[ck] = codes = lowbit.pack4(shards.checked_int4_codes(codes, ck))  # the global form: packed
                fmt = lowbit.stored_format(codes, p.numel())
                lowbit.check_absmax(absmax, p.numel(), fmt, f"{ak} of a param of shape {list(p.shape)}")
            return out
        signed = {s.key: s.signed for s in self.SPEC.states}
        out = {}
        for ck in sorted(k for k in q if k.endswith("_codes")):
            key = ck[: -len("_codes")]
            ak = lowbit.absmax_key(key)
            out[ck], out[ak] = shards.from_global_form(p, q[ck], q[ak], signed.get(key, True))
        return out

    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()
        self._convert_states()

    def _convert_states(self) -> None:
        """Each param's state as this optimizer keeps it: quantized in its group's format where _quantized_state
        (a state of the other format is dequantized and requantized), else full precision."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                quant = self._quantized_state(group, p)
                own = group.get("state_dtype")
                for s in self.SPEC.states:
                    ck = lowbit.codes_key(s.key)
                    if quant and isinstance(st.get(s.key), Tensor):
                        self._quantize_into(p, st, s, st.pop(s.key), own)
                    elif ck in st and (not quant or _runtime_format(p, st[ck]).name != own):
                        if quant:
                            self._quantize_into(p, st, s, self._dequantize_from(p, st, s, torch.float32), own)
                        else:
                            dtype = self._full_precision_state_dtype(group, p)
                            buf = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                            local_tensor(buf).copy_(self._dequantize_from(p, st, s, dtype))
                            st[s.key] = buf


def _check_pairs(q: dict, where: str) -> None:
    """Each quantized state needs both its codes and its absmax (q: the low-bit keys of one param's state)."""
    for key in sorted({k.rsplit("_", 1)[0] for k in q}):
        have = [k in q for k in (lowbit.codes_key(key), lowbit.absmax_key(key))]
        if not all(have):
            given, missing = (lowbit.codes_key(key), lowbit.absmax_key(key))[:: 1 if have[0] else -1]
            raise ValueError(f"{where} has {given!r} but no {missing!r}")


def _runtime_format(p: Tensor, codes: Tensor) -> lowbit.QuantFormat:
    """The format of p's run-time codes. A DTensor param's int8 and fp8 codes are DTensors, its int4 codes a plain
    tensor of its shard's packed bytes: that tells them apart, where the count cannot (a shard of one element has one
    byte of codes in both). A plain param is quantized only from MIN_QUANT_NUMEL elements, where the counts differ."""
    if shards.is_dtensor(p) and not shards.is_dtensor(codes):
        return lowbit.FORMATS["int4"]
    return lowbit.stored_format(local_tensor(codes), local_tensor(p).numel())


def _signed_by_key() -> dict:
    from fusedopt.optim import adagrad, adam, lion, rmsprop, sgd

    return {s.key: s.signed for m in (adagrad, adam, lion, rmsprop, sgd) for s in m.SPEC.states}


def to_full_precision_state_dict(opt_or_state_dict) -> dict:
    """A state_dict with every int8 / int4 / fp8 state dequantized to float32 under torch's key (`exp_avg`, ...) and
    state_dtype=None in the groups: torch.optim (and fusedopt without state_dtype) load it. Takes an optimizer or
    its state_dict; the input is not modified. Under FSDP2 the states are DTensors with their param's placement
    (collective: every rank calls it). Packed int4 codes (a state_dict of an earlier version) do not record their
    param's shape: such a state_dict needs the optimizer (a ValueError says so)."""
    is_opt = hasattr(opt_or_state_dict, "state_dict")
    sd = opt_or_state_dict.state_dict() if is_opt else opt_or_state_dict
    shapes = {}
    if is_opt:  # state_dict() numbers the params in group order
        params = itertools.chain.from_iterable(g["params"] for g in opt_or_state_dict.param_groups)
        shapes = {i: local_tensor(p).shape for i, p in enumerate(params)}
    signed = _signed_by_key()
    state = {}
    for pid, st in sd["state"].items():
        out = {k: v for k, v in st.items() if not _is_q8_key(k)}
        _check_pairs({k: v for k, v in st.items() if _is_q8_key(k)}, f"to_full_precision_state_dict: state {pid}")
        for k in sorted(k for k in st if isinstance(k, str) and k.endswith("_codes")):  # sorted: collective
            key = k[: -len("_codes")]
            codes, absmax = st[k], st[lowbit.absmax_key(key)]
            # int4 codes packed two per byte (a checkpoint of an earlier version): one absmax per 64 of them
            packed = not shards.is_dtensor(codes) and absmax.numel() == lowbit.num_blocks(2 * codes.numel(), "int4")
            if packed and pid not in shapes:
                raise ValueError(f"to_full_precision_state_dict: state {pid} holds int4 {key} states, whose codes do "
                                 "not record the param's shape: pass the optimizer, not its state_dict")
            out[key] = shards.dequantize_global_form(codes, absmax, signed.get(key, True),
                                                     shapes[pid] if packed else None)  # fmt: skip
        state[pid] = out
    groups = [{**g, "state_dtype": None} if "state_dtype" in g else dict(g) for g in sd["param_groups"]]
    return {**sd, "state": state, "param_groups": groups}
