import pytest
import torch
import torch.nn.functional as F

from nemo_pp.loss.masked_ce import MaskedCrossEntropy


def _data(b=2, s=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return logits, labels


def _ref(logits, labels, reduction):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_torch_reference(reduction):
    logits, labels = _data()
    got = MaskedCrossEntropy(reduction=reduction)(logits, labels)
    torch.testing.assert_close(got, _ref(logits, labels, reduction))


def test_default_reduction_is_sum_and_no_shift():
    logits, labels = _data()
    got = MaskedCrossEntropy()(logits, labels)
    # Position t is scored against labels[t] itself (labels come pre-shifted).
    manual = sum(
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]]
        for b in range(2) for t in range(5) if labels[b, t] != -100
    )
    torch.testing.assert_close(got, manual)


def test_flat_inputs():
    logits, labels = _data()
    flat = MaskedCrossEntropy()(logits.reshape(-1, 11), labels.reshape(-1))
    torch.testing.assert_close(flat, _ref(logits, labels, "sum"))


def test_mask_zero_positions_are_ignored():
    logits, labels = _data()
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[1, :3] = False
    expect_labels = labels.clone()
    expect_labels[1, :3] = -100
    for reduction in ("sum", "mean"):
        got = MaskedCrossEntropy(reduction=reduction)(logits, labels, mask=mask)
        torch.testing.assert_close(got, _ref(logits, expect_labels, reduction))
    got_int = MaskedCrossEntropy()(logits, labels, mask=mask.long())
    torch.testing.assert_close(got_int, _ref(logits, expect_labels, "sum"))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_num_label_tokens_overrides_reduction(reduction):
    logits, labels = _data()
    got = MaskedCrossEntropy(reduction=reduction)(logits, labels, num_label_tokens=37)
    torch.testing.assert_close(got, _ref(logits, labels, "sum") / 37)
    got_t = MaskedCrossEntropy(reduction=reduction)(logits, labels, num_label_tokens=torch.tensor(37))
    torch.testing.assert_close(got_t, _ref(logits, labels, "sum") / 37)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_ignored_gives_zero_and_finite_grad(reduction):
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss = MaskedCrossEntropy(reduction=reduction)(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad == 0).all()


def test_bf16_input_is_upcast():
    logits, labels = _data(v=50)
    bf = logits.to(torch.bfloat16)
    got = MaskedCrossEntropy()(bf, labels)
    assert got.dtype == torch.float32
    # Same as computing on the bf16 values promoted to fp32.
    torch.testing.assert_close(got, _ref(bf.float(), labels, "sum"))
    no_upcast = MaskedCrossEntropy(fp32_upcast=False)(bf, labels)
    assert no_upcast.dtype == torch.bfloat16


def test_gradient_matches_reference():
    logits, labels = _data()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    MaskedCrossEntropy(reduction="mean")(a, labels).backward()
    _ref(b, labels, "mean").backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_custom_ignore_index():
    logits, labels = _data()
    labels = labels.masked_fill(labels == -100, -1)
    got = MaskedCrossEntropy(ignore_index=-1)(logits, labels)
    expect = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-1, reduction="sum")
    torch.testing.assert_close(got, expect)


def test_invalid_reduction_names_allowed_values():
    with pytest.raises(ValueError, match="sum.*mean"):
        MaskedCrossEntropy(reduction="none")


def test_shape_mismatch_raises():
    logits, labels = _data()
    with pytest.raises(ValueError, match="disagree"):
        MaskedCrossEntropy()(logits[:, :-1], labels)
    with pytest.raises(ValueError, match="mask"):
        MaskedCrossEntropy()(logits, labels, mask=torch.ones(2, 4))
