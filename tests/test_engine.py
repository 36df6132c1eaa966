"""The core math against numbers computed by hand from the algorithm of docs/cal.md."""
import math

import pytest
import torch

from calplug.gap import hidden_target_logits, main_target_logits, shift_targets, target_gap
from calplug.loss import weighted_cross_entropy
from calplug.weighting import clamp_and_pool
from calplug.reference import reference_cal_loss, reference_weights

# Two sequences of 3 shifted rows each; row 1 of sequence 0 is ignored.
DELTA = torch.tensor([[0.5, 3.0, 7.0], [2.0, -1.0, 4.0]])
SUPERVISED = torch.tensor([[True, False, True], [True, True, True]])
# clamp to [1, 5]: [[1, 3, 5], [2, 1, 4]]


def test_flat_pooling_crosses_ignored_rows_and_sequence_boundaries():
    w = clamp_and_pool(DELTA, SUPERVISED, alpha=1.0, beta=5.0, window=3, scope="flat")
    # flattened [1, 3, 5, 2, 1, 4]; ends average two values (padding not counted)
    expected = torch.tensor([[(1 + 3) / 2, (1 + 3 + 5) / 3, (3 + 5 + 2) / 3],
                             [(5 + 2 + 1) / 3, (2 + 1 + 4) / 3, (1 + 4) / 2]])
    torch.testing.assert_close(w, expected)


def test_sequence_pooling_stays_inside_each_sequence_and_skips_ignored_rows():
    w = clamp_and_pool(DELTA, SUPERVISED, alpha=1.0, beta=5.0, window=3, scope="sequence")
    expected = torch.tensor([[1.0, 3.0, 5.0],            # row 1 ignored: neighbours pool alone
                             [(2 + 1) / 2, (2 + 1 + 4) / 3, (1 + 4) / 2]])
    torch.testing.assert_close(w, expected)


def test_window_one_is_plain_clamp_and_alpha_equal_beta_is_constant():
    w = clamp_and_pool(DELTA, SUPERVISED, alpha=1.0, beta=5.0, window=1)
    torch.testing.assert_close(w, torch.tensor([[1.0, 3.0, 5.0], [2.0, 1.0, 4.0]]))
    w = clamp_and_pool(DELTA, SUPERVISED, alpha=2.5, beta=2.5, window=5)
    assert torch.all(w == 2.5)


def test_window_five():
    w = clamp_and_pool(DELTA, SUPERVISED, alpha=1.0, beta=5.0, window=5, scope="flat")
    flat = [1, 3, 5, 2, 1, 4]
    exp = [sum(flat[max(0, i - 2):i + 3]) / len(flat[max(0, i - 2):i + 3]) for i in range(6)]
    torch.testing.assert_close(w.view(-1), torch.tensor(exp))


def test_weighted_cross_entropy_by_hand():
    # B=1, L=3, V=2: rows 0 and 1 predict labels[1] and labels[2]
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    weights = torch.tensor([[2.0, 3.0]])
    ce0 = math.log(1 + math.exp(-2.0))          # target 0 of logits [2, 0]
    ce1 = math.log(1 + math.exp(-1.0))          # target 1 of logits [0, 1]
    expected = (2 * ce0 + 3 * ce1) / (2 + 3 + 1e-6)
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    # ignored rows carry no loss and do not count in the normaliser
    labels = torch.tensor([[-100, -100, 1]])
    expected = 3 * ce1 / (3 + 1e-6)
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)


def test_no_gradient_flows_through_weights():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    delta = torch.randn(2, 4, requires_grad=True)
    w = clamp_and_pool(delta, labels[:, 1:] >= 0, alpha=0.0, beta=5.0, window=3)
    assert not w.requires_grad
    weights = torch.rand(2, 4, requires_grad=True)
    loss = weighted_cross_entropy(logits, labels, weights)
    loss.backward()
    assert weights.grad is None and logits.grad is not None


def test_target_logits_without_full_product():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(10, 8), torch.randn(50, 8), torch.randn(50)
    targets = torch.randint(0, 50, (10,))
    full = hidden @ weight.T + bias
    torch.testing.assert_close(hidden_target_logits(hidden, weight, bias, targets),
                               full[torch.arange(10), targets])
    torch.testing.assert_close(hidden_target_logits(hidden, weight, None, targets),
                               (hidden @ weight.T)[torch.arange(10), targets])


def test_ignored_rows_take_token_zero():
    labels = torch.tensor([[-100, 4, -100, 2]])
    shifted, targets, supervised = shift_targets(labels)
    assert targets.tolist() == [[4, 0, 2]]
    assert supervised.tolist() == [[True, False, True]]
    logits = torch.arange(4 * 6, dtype=torch.float).view(1, 4, 6)
    assert main_target_logits(logits, targets).tolist() == [[4.0, 6.0, 14.0]]


@pytest.mark.parametrize("alpha, beta, window", [(1.0, 5.0, 3), (0.0, 0.3, 3), (0.0, 5.0, 1), (0.2, 0.2, 3)])
def test_engine_pipeline_matches_reference(alpha, beta, window):
    torch.manual_seed(1)
    logits, logits_wo = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    _, targets, supervised = shift_targets(labels)
    main = main_target_logits(logits, targets)
    contrast = main_target_logits(logits_wo, targets)
    delta = target_gap(main, targets, contrast.view(-1), torch.ones_like(supervised))
    w = clamp_and_pool(delta, supervised, alpha=alpha, beta=beta, window=window)
    ref_w, ref_delta = reference_weights(logits, logits_wo, labels, alpha, beta, window)
    torch.testing.assert_close(delta.view(-1), ref_delta)
    torch.testing.assert_close(w.view(-1), ref_w)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, w),
                               reference_cal_loss(logits, logits_wo, labels, alpha, beta, window))


def test_num_items_in_batch_scales_by_token_share():
    torch.manual_seed(2)
    logits, labels = torch.randn(1, 5, 7), torch.randint(0, 7, (1, 5))
    w = torch.rand(1, 4) + 0.5
    plain = weighted_cross_entropy(logits, labels, w)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, w, num_items_in_batch=4), plain)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, w, num_items_in_batch=8), plain / 2)
