"""Master weights for 16-bit params, the optimizer side (`master_weights=`, docs/MASTER_WEIGHTS.md).

A param group option, like state_dtype (and combined with it):
- `master_weights=True` (or "fp32"): each bfloat16/float16 param keeps a float32 copy, state["master_param"];
- `master_weights="remainder"` (bfloat16 params): state["param_remainder"], int16, the low half of the float32
  master (fusedopt/master_weights.py); the bf16 param is the high half.
Such a param's other states (exp_avg, ...) are float32, or low-bit codes under state_dtype. The kernels read the
param's value from its master and write both back in the same pass; float32/float64 params of the group step as
usual (they are their own master).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt.optim._base import Bucket, FusedOptimizerMixin, local_tensor

MASTER_KEYS = {"fp32": "master_param", "remainder": "param_remainder"}
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def check_master_weights(value) -> str | None:
    """None, "fp32" or "remainder" from the keyword's value (False/None, True/"fp32", "remainder")."""
    if value is None or value is False:
        return None
    if value is True or value == "fp32":
        return "fp32"
    if value == "remainder":
        return "remainder"
    raise ValueError(f"Invalid master_weights value: {value!r} (expected False, True, 'fp32' or 'remainder')")


class MasterWeightsMixin(FusedOptimizerMixin):
    """State creation, bucket lists and state_dict handling of master weights."""

    def _follow_group_options(self, gi: int, group: dict) -> None:
        """A new or changed master_weights is validated and normalized; a change between steps converts the states
        at the next step, as a load into an optimizer of the new mode does (_convert_masters)."""
        super()._follow_group_options(gi, group)
        value = group.get("master_weights")
        seen = self._group_options.get((gi, "master_weights"), "")
        if seen == value:
            return
        mode = check_master_weights(value)
        if "master_weights" in group:
            group["master_weights"] = mode
        if mode is not None:
            name = type(self).__name__
            if getattr(self, "bf16_stochastic_round", False):
                raise ValueError(f"fusedopt.optim.{name}: master_weights and bf16_stochastic_round exclude each other "
                                 "(with a master, the bf16 param is the master rounded to nearest)")  # fmt: skip
            if mode == "remainder" and any(p.dtype == torch.float16 for p in group["params"]):
                raise ValueError(f"fusedopt.optim.{name}: master_weights='remainder' needs bfloat16 params (a float16 "
                                 "param is not the high half of a float32); use master_weights=True "
                                 "for float16")  # fmt: skip
        if seen != "" and seen != mode:
            self._convert_masters()
            self._bucket_cache.clear()
        self._group_options[gi, "master_weights"] = mode

    def _master_mode(self, group: dict, p: Tensor) -> str | None:
        """The param's master kind: the group's, for a 16-bit param; else None."""
        mode = group.get("master_weights")
        return mode if mode is not None and p.dtype in _SIXTEEN_BIT else None

    def _full_precision_state_dtype(self, group: dict, p: Tensor) -> torch.dtype:
        return torch.float32 if self._master_mode(group, p) else super()._full_precision_state_dtype(group, p)

    def _new_master(self, p: Tensor, mode: str) -> Tensor:
        if mode == "fp32":
            return p.detach().to(torch.float32, memory_format=torch.contiguous_format).clone()
        return torch.zeros_like(p, dtype=torch.int16, memory_format=torch.contiguous_format)  # master == param

    def _masters(self, group: dict, bucket: Bucket) -> list:
        """The bucket's masters (float32 copies or int16 remainders), made for params that lack one; [] when off."""
        mode = self._master_mode(group, bucket.params[0])
        if mode is None:
            return []
        key = MASTER_KEYS[mode]
        if key not in bucket.state_lists:
            for p in bucket.params:
                if key not in self.state[p]:
                    self.state[p][key] = self._new_master(p, mode)
                    _float32_states(self.state[p])  # made by torch's constructor (Adagrad's sum) in p's dtype
            bucket.state_lists.clear()  # the state lists are rebuilt from the float32 states
            bucket.extra.pop("cpp_buckets", None)
            bucket.state_lists[key] = [local_tensor(self.state[p][key]) for p in bucket.params]
        return bucket.state_lists[key]

    # --- state_dict ---------------------------------------------------------------------------------------------
    def _load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor to its param's dtype: a master-weight param's float32 states and master (and
        # int16 remainder) are set aside and put back as they are, then converted to this optimizer's mode (which a
        # checkpoint's group value does not change).
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        params = [p for g in self.param_groups for p in g["params"]]
        kept = {}
        for pid, p in zip(ids, params):
            st = state_dict["state"].get(pid)
            if st and self._master_mode(owner[id(p)], p) is not None:
                kept[pid] = {k: v for k, v in st.items()  # 8-bit states: LowBitStateMixin converts them
                             if k != "step" and isinstance(v, Tensor) and not k.endswith(("_codes", "_absmax"))}
        own = [g.get("master_weights") for g in self.param_groups]
        had = ["master_weights" in g for g in self.param_groups]
        super()._load_state_dict(state_dict)
        for g, mode, present in zip(self.param_groups, own, had):  # the optimizer's own mode wins, as state_dtype
            if present:
                g["master_weights"] = mode
            else:
                g.pop("master_weights", None)
        for pid, p in zip(ids, params):
            if pid in kept:
                dev = local_tensor(p).device
                self.state[p].update({k: v.to(dev) if not hasattr(v, "_local_tensor") else v
                                      for k, v in kept[pid].items()})  # fmt: skip
        self._convert_masters()
        self._bucket_cache.clear()

    def _convert_masters(self) -> None:
        """Each param's state as this optimizer keeps it: a master of the group's kind (from the other kind, or the
        param itself), float32 states beside it; no master keys where the group has none."""
        from fusedopt import master_weights

        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                mode = self._master_mode(group, p)
                if mode is None:  # states in the param's dtype, as torch keeps them (a load's are cast already)
                    for k in MASTER_KEYS.values():
                        st.pop(k, None)
                    for k, v in list(st.items()):
                        if k != "step" and not k.endswith(("_codes", "_absmax")) and isinstance(v, Tensor) \
                                and v.is_floating_point():  # fmt: skip
                            st[k] = v.to(self._full_precision_state_dtype(group, p))
                    continue
                lp = local_tensor(p)
                if mode == "fp32" and "master_param" not in st:
                    rem = st.pop("param_remainder", None)
                    st["master_param"] = self._new_master(p, mode)
                    if rem is not None:
                        local_tensor(st["master_param"]).copy_(master_weights.join(lp, local_tensor(rem)))
                elif mode == "remainder" and "param_remainder" not in st:
                    master = st.pop("master_param", None)
                    st["param_remainder"] = self._new_master(p, mode)
                    if master is not None:  # the param becomes the master's high half, as the step leaves it
                        high, low = master_weights.split(local_tensor(master).to(lp.device))
                        with torch.no_grad():
                            lp.copy_(high)
                        local_tensor(st["param_remainder"]).copy_(low)
                st.pop("master_param" if mode == "remainder" else "param_remainder", None)
                _float32_states(st)


def _float32_states(st: dict) -> None:
    """The states beside a master in float32 (step, the master itself and low-bit codes and absmax aside: fp8 codes
    are a floating dtype)."""
    for k, v in list(st.items()):
        kept = k in MASTER_KEYS.values() or k == "step" or k.endswith(("_codes", "_absmax"))
        if not kept and isinstance(v, Tensor) and v.is_floating_point():
            st[k] = v.to(torch.float32)
