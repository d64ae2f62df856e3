"""What every fusedopt optimizer shares: param grouping by (device, dtype), cached tensor tables, GradScaler's
unscale/inf-skip, the backend choice, and torch-compatible state handling.

Each optimizer subclasses the torch.optim class it replaces (so its signature, ValueErrors, defaults, state_dict
and isinstance checks are torch's) and this mixin, and implements `_init_state` and `_step_bucket`.

`max_grad_norm=` folds clip_grad_norm_ into step(): one fused read of every grad gives the global 2-norm, and the
clip coefficient joins GradScaler's scale in the kernels' grad divisor, so the grads are never rewritten.
"""

from __future__ import annotations

import functools
import itertools
import operator
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusedopt import _backend
from fusedopt.ops import grad_norm as grad_norm_op
from fusedopt.optim import _hooks


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


@dataclass
class Bucket:
    """The tensors of one param group that share a device and dtype: one kernel launch per step."""

    device: torch.device
    dtype: torch.dtype
    params: list  # the user's params (maybe DTensor), for state lookup
    local_params: list  # what the kernel writes
    state_lists: dict = field(default_factory=dict)  # state key -> list of local tensors, aligned with params
    steps: list = field(default_factory=list)
    backend: str = "torch"
    # per-bucket caches: the C++-held lists by used-state mask, the stochastic-rounding state
    extra: dict = field(default_factory=dict)
    index: list = field(default_factory=list)  # positions of `params` in their group
    pass_index: int = 0  # > 0: the repeated entries of a param listed more than once in its group (see _passes)
    repeated: bool = False  # pass 0 of a (device, dtype) kind that has later passes
    group_index: int = 0
    quantized: bool = False  # 8-bit block-wise states (state_dtype="int8", fusedopt/optim/_lowbit.py)


def _passes(params: list, idx: list) -> list:
    """`idx` split into lists of distinct params. torch steps a param listed twice in a group twice, one update after
    the other (it warns at construction); one kernel over both entries would read the old values twice. Pass k holds
    the k-th occurrences, so running the passes in order gives torch's result."""
    if len({id(params[i]) for i in idx}) == len(idx):
        return [idx]
    seen: dict = {}
    passes: list = []
    for i in idx:
        k = seen.get(id(params[i]), 0)
        seen[id(params[i])] = k + 1
        if k == len(passes):
            passes.append([])
        passes[k].append(i)
    return passes


# not copied with the optimizer: a copy rebuilds them from its own state (and registers its own state_dict hook)
_TRANSIENT = ("_bucket_cache", "_state_seen", "_finish_hook_id")


@functools.cache
def _torch_optimizer_attributes() -> frozenset:
    """The attributes torch.optim.Optimizer.__init__ sets (torch's __getstate__ keeps three of them, by design)."""
    return frozenset(vars(torch.optim.Optimizer([torch.zeros(1)], {})))


class _IdentitySnapshot:
    """The state check where fusedopt._C is not built: the mapping's identity and size only (a replaced entry is
    not seen)."""

    def __init__(self):
        self._seen = None

    def refresh(self, mapping) -> bool:
        seen, self._seen = self._seen, (mapping, len(mapping))
        return seen is None or seen[0] is not mapping or seen[1] != len(mapping)


def _new_state_snapshot():
    mod, _ = _backend.cpu_extension()
    return mod.StateSnapshot() if hasattr(mod, "StateSnapshot") else _IdentitySnapshot()


def _finish_state_dict_hook(optimizer, state_dict: dict) -> dict:
    """The state_dict post-hook of every fusedopt optimizer (FusedOptimizerMixin.state_dict)."""
    return optimizer._finish_state_dict(state_dict)


ROUND_COUNTERS = "stochastic_round_counters"  # a param group's key in state_dicts: "pass:positions" -> counter


class FusedOptimizerMixin:
    """Shared machinery. Subclasses set STATE_KEYS and OP_NAME and implement _init_state and _step_bucket."""

    STATE_KEYS: tuple = ()
    OP_NAME = "optimizer"
    HAS_STEP = True  # state carries 'step' (SGD's does not)
    LAZY_STATE = False  # True: _step_bucket creates the state itself (SGD, as torch does)
    SERVES_STATE_DTYPE = False  # low-bit states (fusedopt/optim/_lowbit.py); the others refuse a group's state_dtype
    _step_supports_amp_scaling = True

    def _fusedopt_setup(self, backend: str | None, differentiable: bool, max_grad_norm: float | None = None,
                        state_dtype: str | None = None, bf16_stochastic_round: bool = False,
                        stochastic_round_seed: int = 0, master_weights=False) -> None:  # fmt: skip
        if max_grad_norm is not None and not float(max_grad_norm) >= 0.0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (expected a number >= 0, or None)")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # Per-step results live in a dict, not in attributes: torch.compile (Dynamo) drops attribute writes made on
        # an optimizer inside a compiled step, but replays dict writes.
        self._fusedopt_stats: dict = {}
        self._group_options: dict = {}  # (group index, option) -> the value its states were last made for
        if differentiable:
            raise NotImplementedError(
                f"fusedopt.optim.{type(self).__name__} does not support differentiable=True: its fused kernels "
                "update in place outside autograd. Use torch.optim for differentiable optimization."
            )
        _backend.requested_backend(backend)  # validates the name early
        self._fusedopt_extra_defaults = {"backend": backend}
        if master_weights is not None and master_weights is not False:  # checked per group (optim/_master.py)
            self._fusedopt_extra_defaults["master_weights"] = master_weights
        if state_dtype is not None:
            from fusedopt import lowbit

            self._fusedopt_extra_defaults["state_dtype"] = lowbit.check_state_dtype(state_dtype)
        self._bucket_cache: dict = {}
        self._buckets_built = 0  # bucket-cache misses: a step that had one records the state it made
        self.bf16_stochastic_round = bool(bf16_stochastic_round)
        self._stochastic_round_seed = int(stochastic_round_seed)
        self._stochastic_round_states: dict = {}  # bucket identity -> int64 [seed, counter] on its device

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The unscaled global grad norm of the last step (max_grad_norm set), on the device; None before."""
        return self._fusedopt_stats.get("last_grad_norm")

    # --- param groups and state ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for key, value in getattr(self, "_fusedopt_extra_defaults", {}).items():
            self.param_groups[-1].setdefault(key, value)
            self.defaults.setdefault(key, value)
        if getattr(self, "bf16_stochastic_round", False):
            self.param_groups[-1].setdefault(ROUND_COUNTERS, {})  # state_dict() fills it (see there)
        self._follow_group_options(len(self.param_groups) - 1, self.param_groups[-1])
        if hasattr(self, "_bucket_cache"):
            self._bucket_cache.clear()

    # --- copies: copy.deepcopy and pickling (torch.save(optimizer)) ---------------------------------------------
    def __getstate__(self) -> dict:
        """torch's (defaults, state, param_groups) and every attribute of fusedopt's: torch's alone dropped them, so
        a copy failed its first step. The bucket cache is left out: it holds views of this optimizer's tensors (and
        C++-held lists of them); the copy builds its own."""
        state = super().__getstate__()
        torch_own = _torch_optimizer_attributes()
        state.update({k: v for k, v in self.__dict__.items() if k not in torch_own and k not in _TRANSIENT})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._bucket_cache = {}
        self.__dict__.setdefault("_buckets_built", 0)  # a copy pickled before the counter existed

    def _drop_buckets_if_state_was_written(self) -> None:
        """The cached buckets hold the state tensors: a state written between steps (`opt.state.clear()`, a new
        `opt.state`, `del opt.state[p]`, `opt.state[p] = {...}`, `opt.state[p]["exp_avg"] = t`) would leave them
        stepping the old tensors, and the new state never moving. Checked at every step against a record of the
        mapping and every param's state entries (fusedopt._C.StateSnapshot: pointer compares in C++, a few ns per
        entry)."""
        snapshot = self.__dict__.get("_state_seen")
        if snapshot is None:
            snapshot = self._state_seen = _new_state_snapshot()
        if snapshot.refresh(self.state):
            self._bucket_cache.clear()

    def _remember_state(self) -> None:
        """After a step that built buckets (which may make state), so that the next step does not count the step's
        own writes as the user's."""
        self._state_seen.refresh(self.state)

    def _follow_group_options(self, gi: int, group: dict) -> None:
        """The group's storage options (state_dtype; master_weights in optim/_master.py), checked when the group is
        added and at every step: torch.optim users set group keys between steps, and a changed option converts the
        states at the next step. Here: without a low-bit path state_dtype is refused, as the constructor refuses the
        keyword (ignored, it would keep the full-precision states the user meant to save)."""
        if group.get("state_dtype") is not None and not self.SERVES_STATE_DTYPE:
            name, state_dtype = type(self).__name__, group["state_dtype"]
            raise ValueError(f"fusedopt.optim.{name} does not support state_dtype={state_dtype!r} (it has no low-bit "
                             "state path): use state_dtype=None")  # fmt: skip

    def state_dict(self) -> dict:
        """torch's, with fusedopt's additions (`_finish_state_dict`) made by a post-hook that runs before any other:
        the user's state_dict post-hooks see the state_dict as it is returned. Registered here, not at construction
        (torch's __init__ makes the hook registry after the mixin's setup), and again after a copy (torch's copies
        drop their hooks)."""
        if self.__dict__.get("_finish_hook_id") not in self._optimizer_state_dict_post_hooks:
            self._finish_hook_id = self.register_state_dict_post_hook(_finish_state_dict_hook, prepend=True).id
        return super().state_dict()

    def _finish_state_dict(self, sd: dict) -> dict:
        """Each group's stochastic-rounding counters (bf16_stochastic_round) under ROUND_COUNTERS, so a resumed run
        draws the random stream the uninterrupted one would. Reads the counters: one sync per call.

        With the mode on, every live group holds the key too, as an empty placeholder: DCP's flattened optimizer
        state_dict loads only the group keys the live optimizer has (torch.distributed.checkpoint.state_dict)."""
        for group in sd["param_groups"]:
            if ROUND_COUNTERS in group:
                group[ROUND_COUNTERS] = {}  # a new dict: the live group's placeholder stays empty
        keys = list(self._stochastic_round_states)
        if not keys:
            return sd
        values = torch.stack([s[1].cpu() for s in self._stochastic_round_states.values()]).tolist()  # one sync
        for (gi, index, pass_index), counter in zip(keys, values):
            counters = sd["param_groups"][gi].setdefault(ROUND_COUNTERS, {})
            counters[f"{pass_index}:{','.join(map(str, index))}"] = counter
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, with the user's load hooks where torch runs them (optim/_hooks.py): the pre-hooks see the
        state_dict as passed, the post-hooks the optimizer after fusedopt's own conversions. The mixins' part is
        `_load_state_dict`, chained."""
        _hooks.load_with_hooks(self, state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict) -> None:
        # The backend belongs to the machine the optimizer runs on, not to the checkpoint: torch's load would set each
        # group's to the saved one (a backend="cuda" checkpoint would then fail its first step on a CPU machine).
        own = [g.get("backend") for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._stochastic_round_states = {}  # the checkpoint's counters, or new streams (torch.optim's has none)
        for gi, (group, backend) in enumerate(zip(self.param_groups, own)):
            group["backend"] = backend
            saved_counters = group.pop(ROUND_COUNTERS, {})
            if self.bf16_stochastic_round:
                group[ROUND_COUNTERS] = {}  # the live placeholder (state_dict)
            for where, counter in saved_counters.items():
                pass_index, index = where.split(":")
                key = (gi, tuple(int(i) for i in index.split(",")), int(pass_index))
                state = self._new_stochastic_round_state(key, local_tensor(group["params"][key[1][0]]).device)
                state[1] = int(counter)
        self._after_load_state_dict()

    def _after_load_state_dict(self) -> None:
        # A torch.optim state_dict may carry 'step' as a CPU float64/float32 scalar: the kernels want float32 on
        # the param's device. Groups loaded from torch lack our extra keys.
        for group in self.param_groups:
            for key, value in self._fusedopt_extra_defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    step = st["step"]
                    if not isinstance(step, Tensor):
                        step = torch.tensor(float(step))
                    st["step"] = step.to(device=local_tensor(p).device, dtype=torch.float32).reshape(())
        self._bucket_cache.clear()

    def _new_step_tensor(self, p: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        raise NotImplementedError

    def _full_precision_state_dtype(self, group: dict, p: Tensor) -> torch.dtype:
        """The dtype of p's full-precision states: the param's (float32 beside a master: optim/_master.py)."""
        return p.dtype

    def _quantized_state(self, group: dict, p: Tensor) -> bool:
        """Whether p's state is 8-bit (fusedopt/optim/_lowbit.py); a bucket holds one kind."""
        return False

    # --- buckets --------------------------------------------------------------------------------------------
    def _buckets(self, gi: int, group: dict, with_grad: list) -> list:
        """Buckets for the params of `group` that have a grad; cached until that set changes."""
        self._follow_group_options(gi, group)
        # the group's backend too: set between steps, it takes effect (buckets resolve it, and validate the name)
        key = (gi, len(group["params"]), tuple(with_grad) if len(with_grad) != len(group["params"]) else None,
               group.get("backend"))  # fmt: skip
        cached = self._bucket_cache.get(key)
        params = group["params"]
        # the list itself, and each entry (`group["params"][i] = new_param` keeps the list and its length): an
        # identity test per param at C speed, a fifth of the cost of step()'s p.grad gather
        if cached is not None and cached[0] is params and all(map(operator.is_, params, cached[1])):
            return cached[2]
        by_kind: dict = {}
        for i in with_grad:
            p = params[i]
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"fusedopt.optim.{type(self).__name__} does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError(f"fusedopt.optim.{type(self).__name__} does not support complex params yet")
            lp = local_tensor(p)
            by_kind.setdefault((lp.device, lp.dtype, self._quantized_state(group, p)), []).append(i)
        buckets = [
            self._make_bucket(gi, group, device, dtype, idx, pass_index, quantized)
            for (device, dtype, quantized), idx_all in by_kind.items()
            for pass_index, idx in enumerate(_passes(group["params"], idx_all))
        ]
        for b, after in itertools.pairwise(buckets):
            b.repeated = b.pass_index == 0 and after.pass_index == 1
        self._bucket_cache[key] = (params, list(params), buckets)
        if not torch.compiler.is_compiling():
            self._buckets_built += 1
        return buckets

    def _make_bucket(self, gi: int, group: dict, device, dtype, idx: list, pass_index: int,
                     quantized: bool = False) -> Bucket:  # fmt: skip
        params = [group["params"][i] for i in idx]
        b = Bucket(device, dtype, params, [local_tensor(p) for p in params], index=idx, pass_index=pass_index,
                   group_index=gi, quantized=quantized)  # fmt: skip
        if not self.LAZY_STATE:
            for p in params:
                if not self.state.get(p):
                    self._init_state(group, p, self.state[p])
        if self.HAS_STEP:
            b.steps = [self.state[p]["step"] for p in params]
        for k in self.STATE_KEYS:
            if all(k in self.state.get(p, ()) for p in params):
                b.state_lists[k] = [local_tensor(self.state[p][k]) for p in params]
        b.backend = _backend.resolve(group.get("backend"), device, self.OP_NAME)
        return b

    def _stochastic_round_state(self, bucket: Bucket) -> Tensor | None:
        """bf16_stochastic_round: the bucket's int64 [seed, counter] on its device, the counter advanced once per step
        (on the device: no sync, nothing for torch.compile to guard on); None for other dtypes or when off. The seed
        mixes the optimizer's seed with the bucket's place (group, positions, pass), so runs are reproducible and no
        two buckets share a stream; the state outlives a rebuilt bucket."""
        if not self.bf16_stochastic_round or bucket.dtype != torch.bfloat16:
            return None
        state = bucket.extra.get("stochastic_round")
        if state is None:
            key = (bucket.group_index, tuple(bucket.index), bucket.pass_index)
            state = self._stochastic_round_states.get(key)
            if state is None:
                state = self._new_stochastic_round_state(key, bucket.device)
            bucket.extra["stochastic_round"] = state
        state[1:].add_(1)
        return state

    def _new_stochastic_round_state(self, key: tuple, device) -> Tensor:
        seed = (self._stochastic_round_seed * 0x9E3779B9 + zlib.crc32(repr(key).encode())) & (2**63 - 1)
        state = self._stochastic_round_states[key] = torch.tensor([seed, 0], dtype=torch.int64, device=device)
        return state

    def _grads_of(self, bucket: Bucket, grads: list) -> list:
        """The bucket's grads from `grads`, the grads of its whole group (by group position)."""
        gs = grads if len(bucket.index) == len(grads) else [grads[i] for i in bucket.index]
        return [local_tensor(g) for g in gs] if hasattr(gs[0], "_local_tensor") else gs

    # --- GradScaler -----------------------------------------------------------------------------------------
    def _amp_tensors(self, device: torch.device) -> tuple:
        """GradScaler sets grad_scale/found_inf on the optimizer around step(); move them to `device`, async."""
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if scale is not None and scale.device != device:
            scale = scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        return scale, found_inf

    # --- step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()  # traced: Dynamo guards on the state it reads
        if not compiling:
            self._drop_buckets_if_state_was_written()
            built = self._buckets_built
        work = []  # (group, bucket, grads): all buckets first, so a folded clip sees every grad
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            # Not `None in grads`: that falls back to Tensor.__eq__ for every grad (tens of microseconds each).
            if any(g is None for g in grads):
                with_grad = [i for i, g in enumerate(grads) if g is not None]
                if not with_grad:
                    continue
            else:
                with_grad = range(len(params))  # not a list: 10^4 int objects per step wake the GC
            work.extend((group, b, self._grads_of(b, grads)) for b in self._buckets(gi, group, with_grad))
        divisors = self._clip_divisors(work) if self.max_grad_norm is not None else {}
        for group, bucket, grads in work:
            grad_scale, found_inf = self._amp_tensors(bucket.device)
            divisor, clip_only = divisors.get(bucket.device, (grad_scale, None))
            # Under GradScaler the kernels leave .grad unscaled, as torch's fused optimizers do. A repeated entry of a
            # param (pass_index > 0) then finds its grad already unscaled by the first pass.
            write_back = grad_scale is not None and bucket.pass_index == 0
            if grad_scale is not None and bucket.pass_index > 0:
                divisor = clip_only
            self._step_bucket(group, bucket, grads, divisor, found_inf, write_back_grads=write_back)
        if not compiling and self._buckets_built != built:
            self._remember_state()
        return loss

    def _bucket_norm(self, bucket: Bucket, local_grads: list) -> Tensor:
        if hasattr(bucket.params[0], "_local_tensor"):  # DTensor (FSDP2): the norm over all ranks' shards
            return grad_norm_op.dtensor_power_sum([p.grad for p in bucket.params], 2.0).sqrt()
        return grad_norm_op.grad_norm(local_grads, 2.0, backend=bucket.backend)

    def _clip_divisors(self, work: list) -> dict:
        """Folded clipping: the global 2-norm of the (unscaled) grads, and per device (the grad divisor
        grad_scale / clip_coef, the divisor 1 / clip_coef alone) with clip_coef = min(max_norm / (norm + 1e-6), 1), as
        clip_grad_norm_ computes it.
        All on the device: no host sync."""
        if not work:
            self._fusedopt_stats["last_grad_norm"] = torch.zeros(())
            return {}
        # A param listed twice in a group counts once, as in clip_grad_norm_(model.parameters()).
        norms = [self._bucket_norm(b, grads) for _, b, grads in work if b.pass_index == 0]
        first = work[0][1].device
        if len(norms) == 1:
            total = norms[0]
        else:
            acc = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
            total = torch.linalg.vector_norm(torch.stack([n.to(first, acc, non_blocking=True) for n in norms]), 2.0)
        scale, _ = self._amp_tensors(first)
        if scale is not None:
            total = total / scale.to(total.dtype)  # GradScaler: clip by the norm of the unscaled grads
        self._fusedopt_stats["last_grad_norm"] = total
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        divisors = {}
        for _, b, _ in work:
            if b.device not in divisors:
                scale, _ = self._amp_tensors(b.device)
                c = coef.to(b.device, non_blocking=True)
                clip_only = c.reciprocal().to(torch.float32)
                divisors[b.device] = ((scale / c).to(torch.float32) if scale is not None else clip_only, clip_only)
        return divisors

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list, grad_divisor, found_inf, *,
                     write_back_grads: bool) -> None:  # fmt: skip
        raise NotImplementedError
