"""rtl.sync_batch_norm on two gloo processes: BatchNorm over both processes' rows equals one process's BatchNorm on
the whole batch (outputs, gradients, running statistics), with uneven shares of the batch."""

import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo backend"
)
def test_two_processes_normalise_like_one_process_on_the_whole_batch(tmp_path, gloo_workers):
    module = gloo_workers(os.path.join(HERE, "_sync_bn_worker.py"))
    x, weighting = module.inputs()
    x.requires_grad_(True)
    norm = module.make_norm()
    for _ in range(2):
        out = norm(x)
    (out * weighting).sum().backward()

    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert not any(g["patched"] for g in got)  # the layer is left as it was after the block
    torch.testing.assert_close(torch.cat([g["out"] for g in got]), out.detach())
    torch.testing.assert_close(torch.cat([g["grad_x"] for g in got]), x.grad)
    # each process holds the affine gradient of its rows: the sum is the whole batch's
    torch.testing.assert_close(got[0]["grad_weight"] + got[1]["grad_weight"], norm.weight.grad)
    torch.testing.assert_close(got[0]["grad_bias"] + got[1]["grad_bias"], norm.bias.grad)
    for g in got:
        torch.testing.assert_close(g["running_mean"], norm.running_mean)
        torch.testing.assert_close(g["running_var"], norm.running_var)


def test_outside_a_process_group_the_model_is_left_alone():
    from rtl.sync_batch_norm import synchronized_batch_norm

    norm = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with synchronized_batch_norm(norm):
        assert "forward" not in vars(norm)
        torch.testing.assert_close(norm(x), torch.nn.functional.batch_norm(x, None, None, norm.weight, norm.bias, True))
