"""torch.optim's state_dict hooks (register_state_dict_pre_hook / _post_hook, register_load_state_dict_pre_hook /
_post_hook), run where a user of torch.optim expects them when fusedopt does work around torch's own state_dict
and load_state_dict:

- `load_with_hooks`: the load pre-hooks see the state_dict as the user passed it (fusedopt sets its low-bit and
  master keys aside before torch's load, and the hooks used to see it after that), and the post-hooks see the
  optimizer after fusedopt has put those states back;
- `state_dict_with_hooks`: for an optimizer that builds its state_dict without torch's (MuonWithAdamW), whose hooks
  would otherwise never run.
"""

from __future__ import annotations

import collections
from collections.abc import Callable


def load_with_hooks(optimizer, state_dict: dict, load: Callable[[dict], None]) -> None:
    """optimizer.load_state_dict(state_dict) as torch runs its hooks: each pre-hook `hook(optimizer, state_dict)`
    may return a new state_dict, `load` runs with the hook registries emptied (so torch's own load, inside it, does
    not run them a second time or at the wrong moment), then each post-hook `hook(optimizer)`."""
    pre = optimizer._optimizer_load_state_dict_pre_hooks
    post = optimizer._optimizer_load_state_dict_post_hooks
    state_dict = state_dict.copy()  # torch's hooks get a shallow copy: one may edit it without touching the caller's
    for hook in list(pre.values()):
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    # the same OrderedDicts are put back: the handles of registered hooks hold them (weakly)
    optimizer._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = collections.OrderedDict()
    try:
        load(state_dict)
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = pre
        optimizer._optimizer_load_state_dict_post_hooks = post
    for hook in list(post.values()):
        hook(optimizer)


def state_dict_with_hooks(optimizer, make: Callable[[], dict]) -> dict:
    """`make()` between torch's state_dict hooks: each pre-hook `hook(optimizer)`, then each post-hook
    `hook(optimizer, state_dict)`, whose return value (if not None) is the state_dict from then on."""
    for hook in list(optimizer._optimizer_state_dict_pre_hooks.values()):
        hook(optimizer)
    state_dict = make()
    for hook in list(optimizer._optimizer_state_dict_post_hooks.values()):
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict
