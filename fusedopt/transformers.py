"""fusedopt inside Hugging Face causal LMs, in one line: `apply_fusedopt(model)`.

The patched forward, when the model is training and labels are given, runs the model's own forward with the LM
head's input captured and the head fed zero positions (so no logits are formed), then computes HF's causal-LM loss
with fusedopt's linear_cross_entropy on the captured hidden states and the output embedding's weight, and returns
the model's output with that loss and logits=None. In eval mode, or without labels, the original forward runs
unchanged (logits included). Optional dependency: nothing in fusedopt's core imports this module, and transformers
is imported only when apply_fusedopt is called.

HF's loss semantics (transformers.loss.loss_utils.ForCausalLMLoss): labels shifted left with ignore_index padding
(or the `shift_labels` given), ignore_index -100, a float32 loss (HF upcasts the logits), mean over the kept tokens,
or the sum divided by `num_items_in_batch` when the Trainer passes it (so gradient accumulation equals one big
batch); the hidden states are those the model feeds its head (after `logits_to_keep`); tied embeddings share the
gradient through the shared weight; the config's `final_logit_softcapping` becomes softcap=, Cohere's
`logit_scale` and Granite's `logits_scaling` scale the hidden states (the logits are linear in them).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F

from fusedopt.nn.linear_cross_entropy import linear_cross_entropy

__all__ = ["SUPPORTED_MODEL_TYPES", "apply_fusedopt", "remove_fusedopt"]

# Causal LMs whose forward is "decoder -> (logits_to_keep) -> head(hidden) -> [softcap | scale] -> ForCausalLMLoss",
# each checked against the unpatched model in tests/test_transformers.py.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "cohere", "granite")
_MARK = "_fusedopt_original_forward"


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("fusedopt.transformers needs Hugging Face transformers: pip install transformers") from exc
    return transformers


def _logit_multiplier(model) -> float | None:
    """The factor the model applies to its logits after the head, if any (Cohere, Granite)."""
    if getattr(model, "logit_scale", None) is not None:
        return float(model.logit_scale)
    scaling = getattr(model.config, "logits_scaling", None)
    return None if scaling is None else 1.0 / float(scaling)


def _check_model(model_or_class) -> None:
    config_class = getattr(model_or_class, "config_class", None)
    model_type = getattr(model_or_class.config, "model_type", None) if not isinstance(model_or_class, type) else (
        getattr(config_class, "model_type", None))  # fmt: skip
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"apply_fusedopt: model type {model_type!r} is not verified; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            " Other architectures may post-process their logits in ways the fused loss would not reproduce."
        )
    if not isinstance(model_or_class, type):
        loss_fn = model_or_class.loss_function
        expected = _transformers().loss.loss_utils.LOSS_MAPPING["ForCausalLM"]
        if loss_fn is not expected:
            raise NotImplementedError(f"apply_fusedopt: the model's loss_function is {loss_fn!r}, not HF's "
                                      "ForCausalLMLoss; the fused loss reproduces only that one")  # fmt: skip


def _causal_lm_loss(model, hidden, labels, kwargs, opts) -> torch.Tensor:
    """HF's ForCausalLMLoss on head(hidden), fused."""
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = model.get_output_embeddings()
    multiplier = _logit_multiplier(model)
    if multiplier is not None:
        hidden = hidden * multiplier
    hidden, shift_labels = hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1).to(hidden.device)
    if shift_labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"Expected input batch_size ({hidden.shape[0]}) to match target batch_size "
                         f"({shift_labels.shape[0]}).")  # fmt: skip
    num_items = kwargs.get("num_items_in_batch")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(
        hidden, head.weight, shift_labels, linear_bias=head.bias, ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum", softcap=softcap, loss_dtype=torch.float32, **opts,
    )  # fmt: skip
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss


def _fused_call(model, original, signature, args, kwargs, opts):
    """One forward of `model` through `original` (called with `args` as given; `signature` matches them), with the
    fused loss when training with labels."""
    bound = signature.bind(*args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None or not (model.training or opts["in_eval"]):
        return original(*args, **kwargs)
    extra = dict(bound.arguments.get("kwargs", {}))  # the forward's **kwargs: num_items_in_batch, shift_labels, ...
    want_tuple = extra.get("return_dict", kwargs.get("return_dict", getattr(model.config, "return_dict", True)))
    want_tuple = want_tuple is False
    bound.arguments["labels"] = None
    call_kwargs = dict(bound.kwargs, return_dict=True)
    captured = []

    def feed_no_positions(module, inputs):  # the head sees 0 positions: no logits are formed
        captured.append(inputs[0])
        return (inputs[0].narrow(-2, 0, 0), *inputs[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(feed_no_positions)
    try:
        out = original(*bound.args, **call_kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"apply_fusedopt: the model called its output embedding {len(captured)} times in one "
                           "forward (expected once); this architecture is not supported")  # fmt: skip
    loss_opts = {k: v for k, v in opts.items() if k != "in_eval"}
    loss = _causal_lm_loss(model, captured[0], labels, extra, loss_opts)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    out = type(out)(loss=loss, **fields)
    return out.to_tuple() if want_tuple else out


def apply_fusedopt(model, *, backend: str | None = "auto", mode: str = "auto", chunk_size: int | None = None,
                   in_eval: bool = False):  # fmt: skip
    """Route an HF causal LM's training loss through fusedopt's fused linear cross-entropy. `model`: an instance
    (patched alone) or a model class such as LlamaForCausalLM (every instance). Returns `model`.

    backend / mode / chunk_size: passed to fusedopt.nn.functional.linear_cross_entropy. in_eval: also fuse in eval
    mode (then evaluation returns logits=None, which metrics on logits cannot use). Undo with remove_fusedopt."""
    _transformers()
    _check_model(model)
    opts = dict(backend=backend, mode=mode, chunk_size=chunk_size, in_eval=in_eval)
    if isinstance(model, type):  # every instance: forward(self, ...) on the class
        original = model.__dict__.get(_MARK, model.forward)
        signature = inspect.signature(original)  # with self

        @functools.wraps(original)
        def class_forward(self, *args, **kwargs):
            return _fused_call(self, original, signature, (self, *args), kwargs, opts)

        setattr(model, _MARK, original)
        model.forward = class_forward
        return model
    original = getattr(model, _MARK, model.forward)  # bound; re-applying replaces the options, not wraps twice
    signature = inspect.signature(original)

    @functools.wraps(original)
    def instance_forward(self, *args, **kwargs):
        return _fused_call(self, original, signature, args, kwargs, opts)

    # inspect.signature(model.forward) must list the original parameters (the Trainer drops dataset columns the
    # forward does not take): the bound method's function gets them behind a `self` that binding removes.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    instance_forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    setattr(model, _MARK, original)
    model.forward = types.MethodType(instance_forward, model)  # a bound method, as accelerate's autocast expects
    return model


def remove_fusedopt(model):
    """Undo apply_fusedopt on an instance or class."""
    original = model.__dict__.get(_MARK) if isinstance(model, type) else getattr(model, _MARK, None)
    if original is not None:
        model.forward = original
        delattr(model, _MARK)
    return model
