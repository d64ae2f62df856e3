"""Block-wise quantized optimizer states for every spec-driven optimizer (`state_dtype="int8"` or `"int4"`,
docs/LOW_BIT_STATES.md).

A param whose GLOBAL size (a DTensor's full numel, so every rank decides alike) is at least MIN_QUANT_NUMEL keeps
each state `key` as `key_codes` (uint8: int8 the param's shape, int4 packed two per byte, (ceil(numel / 2),)) and
`key_absmax` (float32, one per block of 256 (int8) or 128 (int4) elements); smaller params, and every param of a
group with state_dtype=None, keep torch's full-precision `key`. Loading a state_dict converts each state to what this
optimizer keeps for it (quantizes, dequantizes or changes the format), so full-precision state_dicts of torch.optim
load here and `to_full_precision_state_dict` gives one torch.optim loads.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from fusedopt import lowbit
from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor

_SUFFIXES = ("_codes", "_absmax")


def _is_q8_key(key) -> bool:
    return isinstance(key, str) and key.endswith(_SUFFIXES)


def _zeros_like_local(p: Tensor, dtype) -> Tensor:
    """Contiguous zeros of p's (global) shape as p is held: a DTensor for a DTensor param."""
    if hasattr(p, "_local_tensor"):
        return torch.zeros_like(p, dtype=dtype)
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


def _stored_format(codes: Tensor, numel: int) -> lowbit.QuantFormat:
    """The format of stored codes of a (local) state of `numel` elements: int8 codes hold one per element, int4
    codes one per two (the two differ for every quantized size, numel >= MIN_QUANT_NUMEL)."""
    for fmt in lowbit.FORMATS.values():
        if codes.numel() == fmt.codes_numel(numel):
            return fmt
    raise ValueError(f"quantized state codes of {codes.numel()} bytes match no format for a param of {numel} "
                     "elements (int8: one byte per element, int4: one per two)")  # fmt: skip


class LowBitStateMixin(FusedOptimizerMixin):
    """The state side of state_dtype="int8" / "int4"; SpecOptimizerMixin steps a quantized bucket through
    fusedopt.ops.optim_step.step_q8."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("state_dtype") is not None and any(p.dtype == torch.float64 for p in group["params"]):
            raise ValueError(
                f"fusedopt.optim.{type(self).__name__}: state_dtype={group['state_dtype']!r} does not support "
                "float64 params (low-bit states are for float32, bfloat16 and float16 params); put them in a param "
                "group with state_dtype=None"
            )

    def _quantized_state(self, group: dict, p: Tensor) -> bool:
        return group.get("state_dtype") is not None and p.numel() >= lowbit.MIN_QUANT_NUMEL  # DTensor: global numel

    def _quantize_into(self, p: Tensor, state: dict, spec, value: Tensor, state_dtype: str) -> None:
        """state[key_codes], state[key_absmax] <- value (p's local shape), quantized with spec's map. int8 codes
        follow a DTensor param's placement; int4 codes, like absmax, are a plain tensor of the local shard."""
        lp = local_tensor(p)
        c, a = lowbit.quantize(local_tensor(value).to(lp.device), lowbit.qmap(spec.signed, lp.device, state_dtype),
                               state_dtype)  # fmt: skip
        if state_dtype == "int8":
            codes = _zeros_like_local(p, torch.uint8)
            local_tensor(codes).copy_(c)
            c = codes
        state[lowbit.codes_key(spec.key)] = c
        state[lowbit.absmax_key(spec.key)] = a

    def _dequantize_from(self, p: Tensor, state: dict, spec) -> Tensor:
        """Pops state[key_codes] and state[key_absmax] (either format) and returns the values, p's local shape and
        dtype."""
        lp = local_tensor(p)
        codes = local_tensor(state.pop(lowbit.codes_key(spec.key))).to(lp.device)
        absmax = state.pop(lowbit.absmax_key(spec.key)).to(lp.device)
        fmt = _stored_format(codes, lp.numel())
        return lowbit.dequantize(codes, absmax, lowbit.qmap(spec.signed, lp.device, fmt), lp.dtype, fmt, lp.shape)

    def _new_q8_state(self, group: dict, p: Tensor, spec, state: dict) -> None:
        self._quantize_into(p, state, spec, self._new_state_buffer(group, p, spec), group["state_dtype"])

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
            codes.append(bucket.state_lists[ck] if on else [])
            absmax.append(bucket.state_lists[ak] if on else [])
        return codes, absmax

    # --- state_dict ---------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating-point param's state to the param's dtype: codes and absmax are set aside and
        # put back as they were. The optimizer's own state_dtype wins over the checkpoint's.
        own = [g.get("state_dtype") for g in self.param_groups]
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(ids, params))
        kept, plain = {}, {}
        for pid, st in state_dict["state"].items():
            kept[pid] = {k: v for k, v in st.items() if _is_q8_key(k)}
            plain[pid] = {k: v for k, v in st.items() if not _is_q8_key(k)}
        super().load_state_dict({**state_dict, "state": plain})
        for g, sd in zip(self.param_groups, own):
            g["state_dtype"] = sd
        for pid, q in kept.items():
            if q and pid in by_id:
                p = by_id[pid]
                dev = local_tensor(p).device
                self.state[p].update({k: v.to(dev) if not hasattr(v, "_local_tensor") else v for k, v in q.items()})
        self._convert_states()
        self._bucket_cache.clear()

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
                    elif ck in st and (not quant or _stored_format(local_tensor(st[ck]), local_tensor(p).numel()).name
                                       != own):  # fmt: skip
                        value = self._dequantize_from(p, st, s)
                        if quant:
                            self._quantize_into(p, st, s, value, own)
                        else:
                            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                            local_tensor(buf).copy_(value)
                            st[s.key] = buf


def _signed_by_key() -> dict:
    from fusedopt.optim import adagrad, adam, lion, rmsprop, sgd

    return {s.key: s.signed for m in (adagrad, adam, lion, rmsprop, sgd) for s in m.SPEC.states}


def to_full_precision_state_dict(opt_or_state_dict) -> dict:
    """A state_dict with every int8 / int4 state dequantized to float32 under torch's key (`exp_avg`, ...) and
    state_dtype=None in the groups: torch.optim (and fusedopt without state_dtype) load it. Takes an optimizer or
    its state_dict; the input is not modified. int4 codes do not record their param's shape: a state_dict holding
    int4 states needs the optimizer (a ValueError says so)."""
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
        for k, v in st.items():
            if isinstance(k, str) and k.endswith("_codes"):
                key = k[: -len("_codes")]
                codes = local_tensor(v)
                absmax = st[lowbit.absmax_key(key)].to(codes.device)
                if pid in shapes:
                    fmt = _stored_format(codes, shapes[pid].numel()).name
                else:  # int8: one absmax per 256 codes; int4: per 64 bytes of codes
                    fmt = "int8" if absmax.numel() == lowbit.num_blocks(codes.numel(), "int8") else "int4"
                if fmt == "int4" and pid not in shapes:
                    raise ValueError(f"to_full_precision_state_dict: state {pid} holds int4 {key} states, whose codes "
                                     "do not record the param's shape: pass the optimizer, not its state_dict")
                table = lowbit.qmap(signed.get(key, True), codes.device, fmt)
                out[key] = lowbit.dequantize(codes, absmax, table, state_dtype=fmt, shape=shapes.get(pid))
        state[pid] = out
    groups = [{**g, "state_dtype": None} if "state_dtype" in g else dict(g) for g in sd["param_groups"]]
    return {**sd, "state": state, "param_groups": groups}
