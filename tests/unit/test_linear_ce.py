"""FusedLinearCrossEntropy and ChunkedCrossEntropy against a plain cross entropy of the
logits, in one process: loss and gradients, chunk boundaries, logit transforms, no label
token, the meta device (the memory plan runs it there), and the refusals."""

import pytest
import torch

from nemo_pp.loss import ChunkedCrossEntropy, FusedLinearCrossEntropy, MaskedCrossEntropy


def _data(n_rows=3, seq=11, hidden=8, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, seq, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n_rows, seq), generator=g)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return h, w, labels


def _softcap(z):
    return torch.tanh(z * 0.5 / 2.0) * 2.0


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("transform", [None, _softcap])
def test_fused_matches_cross_entropy_of_the_logits(chunk, transform):
    h, w, labels = _data()
    logits = h @ w.t()
    ref = MaskedCrossEntropy()(logits if transform is None else transform(logits), labels)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    got = FusedLinearCrossEntropy(chunk_size=chunk)(h, labels, w, logits_transform=transform)
    got_h, got_w = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_scale_and_cap_as_numbers_equal_the_transform():
    h, w, labels = _data()
    z = h @ w.t() * 0.5
    ref = MaskedCrossEntropy()(torch.tanh(z / 2.0) * 2.0, labels)
    got = FusedLinearCrossEntropy(chunk_size=5)(h, labels, w, logit_scale=0.5, softcap=2.0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    got = FusedLinearCrossEntropy(logit_softcapping=2.0)(h, labels, w, logit_scale=0.5).detach()
    assert float(got) == pytest.approx(float(ref.detach()))


def test_mean_and_num_label_tokens():
    h, w, labels = _data()
    count = int((labels != -100).sum())
    total = FusedLinearCrossEntropy()(h, labels, w)
    assert float(FusedLinearCrossEntropy(reduction="mean")(h, labels, w)) == pytest.approx(float(total) / count)
    assert float(FusedLinearCrossEntropy()(h, labels, w, num_label_tokens=10)) == pytest.approx(float(total) / 10)


def test_no_label_token_is_zero_with_zero_gradients():
    h, w, labels = _data()
    loss = FusedLinearCrossEntropy()(h, torch.full_like(labels, -100), w)
    loss.backward()
    assert float(loss) == 0.0 and not h.grad.any() and not w.grad.any()


def test_runs_on_meta_for_the_memory_plan():
    h = torch.empty(2, 16, 8, device="meta", requires_grad=True)
    w = torch.empty(37, 8, device="meta", requires_grad=True)
    loss = FusedLinearCrossEntropy(chunk_size=5)(h, torch.zeros(2, 16, dtype=torch.long, device="meta"), w)
    assert loss.is_meta and loss.shape == ()


@pytest.mark.parametrize("chunk", [3, 32])
def test_chunked_matches_masked_cross_entropy(chunk):
    h, w, labels = _data()
    logits = (h @ w.t()).detach().requires_grad_()
    mask = torch.ones_like(labels)
    mask[1, 2] = 0
    ref = MaskedCrossEntropy()(logits, labels, mask)
    ref_grad, = torch.autograd.grad(ref, logits)
    got = ChunkedCrossEntropy(chunk_len=chunk)(logits, labels, mask)
    got_grad, = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert float(ChunkedCrossEntropy(reduction="mean")(logits, labels, mask)) == pytest.approx(
        float(MaskedCrossEntropy(reduction="mean")(logits, labels, mask)))


@pytest.mark.parametrize("kwargs,message", [
    ({"reduction": "none"}, "loss_fn.reduction"),
    ({"impl": "triton"}, "loss_fn.impl"),
    ({"chunk_size": 0}, "loss_fn.chunk_size"),
])
def test_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedLinearCrossEntropy(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_cce_kernel_refused_without_cuda():
    with pytest.raises(ValueError, match="loss_fn.impl: cce needs a CUDA device"):
        FusedLinearCrossEntropy(impl="cce")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cut-cross-entropy kernel needs CUDA")
def test_cce_kernel_matches_the_torch_path_on_cuda():
    pytest.importorskip("cut_cross_entropy")
    h, w, labels = (t.cuda() for t in _data())
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref = FusedLinearCrossEntropy(impl="torch")(h, labels, w, logit_scale=0.5, softcap=2.0)
    got = FusedLinearCrossEntropy(impl="cce")(h, labels, w, logit_scale=0.5, softcap=2.0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
