"""fusedopt.transformers.apply_fusedopt on tiny random Hugging Face causal LMs: the patched model's training loss
and every parameter gradient equal the unpatched model's (HF's own ForCausalLMLoss on full logits), in float32 and
in bfloat16; HF's loss options (num_items_in_batch, shift_labels, logits_to_keep, ignore_index); eval and no-label
calls unchanged; the class-level form; refusals; fusedopt without transformers. The Trainer is tested in
test_transformers_trainer.py."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import tol

transformers = pytest.importorskip("transformers")
from fusedopt.transformers import SUPPORTED_MODEL_TYPES, apply_fusedopt, remove_fusedopt  # noqa: E402

VOCAB = 256
LAYERS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)  # fmt: skip


def tiny_config(model_type: str):
    """A 2-layer config of each architecture; the head-specific options set so that they matter."""
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                       eos_token_id=2)  # fmt: skip  (tied head, dropout off: both runs must agree)
    extra = {
        "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8, final_logit_softcapping=5.0),
        "phi3": dict(original_max_position_embeddings=64),
        "cohere": dict(logit_scale=0.5),  # tied head, logits * 0.5
        "granite": dict(logits_scaling=2.0),  # logits / 2
    }.get(model_type, {})
    return transformers.AutoConfig.for_model(model_type, **LAYERS, **extra)


def make_pair(model_type: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type)).to(dtype)
    return model.train(), apply_fusedopt(copy.deepcopy(model)).train()


def batch(seq=12, rows=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    return ids, labels


def assert_same_training_step(plain, fused, dtype, **kwargs):
    """One forward + backward of each with the same inputs: losses, then every parameter's gradient. float32:
    element-wise at float32's tolerance. bfloat16: each gradient within bf16's rtol in norm (HF rounds its logits
    (and Gemma-2's soft-capped ones three times) to bf16 where the fused loss keeps float32)."""
    out_plain, out_fused = plain(**kwargs), fused(**kwargs)
    assert out_fused.logits is None and out_plain.logits is not None
    assert out_fused.loss.dtype == out_plain.loss.dtype == torch.float32
    torch.testing.assert_close(out_fused.loss, out_plain.loss, **tol(dtype, reduction=True))
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(out_fused.loss, [p for p in fused.parameters() if p.requires_grad])
    exp = torch.autograd.grad(out_plain.loss, [p for p in plain.parameters() if p.requires_grad])
    assert len(got) == len(exp) == len(names)
    for name, g, e in zip(names, got, exp):
        assert g.dtype == e.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip
        else:
            err = (g.float() - e.float()).norm() / e.float().norm()
            assert err <= tol(dtype)["rtol"], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_loss_and_grads_match_the_unpatched_model(model_type, dtype):
    plain, fused = make_pair(model_type, dtype)
    ids, labels = batch()
    assert_same_training_step(plain, fused, dtype, input_ids=ids, labels=labels)


def test_tied_heads_share_the_gradient():
    for model_type in ("gpt2", "gemma2", "cohere"):
        _, fused = make_pair(model_type)
        assert fused.get_output_embeddings().weight is fused.get_input_embeddings().weight, model_type


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_hf_loss_options(model_type):
    """num_items_in_batch (sum / count), shift_labels given, logits_to_keep with matching labels, ignore_index."""
    plain, fused = make_pair(model_type)
    ids, labels = batch()
    count = torch.tensor(37)  # as the Trainer passes: the tokens of all accumulated micro-batches
    assert_same_training_step(plain, fused, torch.float32, input_ids=ids, labels=labels, num_items_in_batch=count)
    shifted = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(5))
    shifted[1, 2:5] = -100
    assert_same_training_step(plain, fused, torch.float32, input_ids=ids, labels=labels, shift_labels=shifted)
    assert_same_training_step(plain, fused, torch.float32, input_ids=ids, labels=labels[:, -5:], logits_to_keep=5)
    other = labels.clone()
    other[other == -100] = 7  # with another ignore_index, -100 would be an out-of-range class
    other[1, :6] = 7
    assert_same_training_step(plain, fused, torch.float32, input_ids=ids, labels=other, ignore_index=7)


def test_eval_and_unlabelled_calls_run_the_original_forward():
    plain, fused = make_pair("llama")
    ids, labels = batch()
    for train in (True, False):
        plain.train(train), fused.train(train)
        with torch.no_grad():
            a, b = plain(input_ids=ids), fused(input_ids=ids)
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    with torch.no_grad():  # eval with labels: the original loss and logits, for metrics
        a, b = plain(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    apply_fusedopt(fused, in_eval=True)  # re-applying replaces the options
    with torch.no_grad():
        b = fused(input_ids=ids, labels=labels)
    assert b.logits is None
    torch.testing.assert_close(b.loss, a.loss, **tol(torch.float32, reduction=True))


def test_tuple_output_and_positional_labels():
    plain, fused = make_pair("llama")
    ids, labels = batch()
    out = fused(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], plain(input_ids=ids, labels=labels).loss, **tol(torch.float32, reduction=True))
    positional = fused(ids, None, None, None, None, labels)  # input_ids, attention_mask, position_ids, cache, embeds
    assert positional.logits is None
    torch.testing.assert_close(positional.loss, out[0], rtol=0, atol=0)


def test_class_level_form_and_remove():
    cls = transformers.Qwen2ForCausalLM
    original = cls.forward
    try:
        apply_fusedopt(cls)
        torch.manual_seed(0)
        model = cls(tiny_config("qwen2")).train()
        ids, labels = batch()
        assert model(input_ids=ids, labels=labels).logits is None
        plain = copy.deepcopy(model)
        remove_fusedopt(cls)
        assert cls.forward is original
        assert plain(input_ids=ids, labels=labels).logits is not None
    finally:
        remove_fusedopt(cls)
    assert cls.forward is original


def test_refusals():
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, word_embed_proj_dim=16)  # fmt: skip
    opt = transformers.OPTForCausalLM(cfg)
    with pytest.raises(NotImplementedError, match="not verified"):
        apply_fusedopt(opt)
    plain, _ = make_pair("llama")
    plain.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(NotImplementedError, match="ForCausalLMLoss"):
        apply_fusedopt(plain)


def test_fusedopt_imports_and_works_without_transformers():
    """fusedopt never imports transformers itself, and with transformers unavailable everything else works and
    apply_fusedopt says what to install."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'accelerate'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, fusedopt, fusedopt.transformers\n"
        "x, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)\n"
        "fusedopt.nn.functional.linear_cross_entropy(x, w, torch.tensor([1, 2, 3, 4])).backward()\n"
        "assert 'transformers' not in sys.modules\n"
        "try:\n"
        "    fusedopt.transformers.apply_fusedopt(torch.nn.Linear(2, 2))\n"
        "except ImportError as e:\n"
        "    assert 'pip install transformers' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
