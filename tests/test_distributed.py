"""synchronized=True over a real 2-process gloo group equals one process normalizing the whole batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit

SIZES = (3, 5)  # uneven local batches: the merge must weigh by counts


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 4, 3, generator=generator, dtype=torch.float64) * 2 + 1
    g = torch.randn(sum(SIZES), 4, 3, generator=generator, dtype=torch.float64)
    return x, g


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, g = _data()
        start = sum(SIZES[:rank])
        local_x = x[start:start + SIZES[rank]].clone().requires_grad_()
        layer = normkit.BatchNorm(4, synchronized=True).double()
        with torch.no_grad():
            layer.weight.copy_(torch.arange(1.0, 5.0, dtype=torch.float64))
        y = layer(local_x)
        y.backward(g[start:start + SIZES[rank]])
        torch.save({"y": y.detach(), "grad": local_x.grad, "weight_grad": layer.weight.grad,
                    "running_mean": layer.running_mean, "running_var": layer.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store test runs on POSIX")
def test_two_process_gloo_equals_single_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    x, g = _data()
    x = x.clone().requires_grad_()
    single = normkit.BatchNorm(4).double()
    with torch.no_grad():
        single.weight.copy_(torch.arange(1.0, 5.0, dtype=torch.float64))
    y = single(x)
    y.backward(g)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), x.grad)
    # Parameter gradients are local (DDP all-reduces them): their sum is the whole batch's.
    torch.testing.assert_close(results[0]["weight_grad"] + results[1]["weight_grad"], single.weight.grad)
    for r in results:
        torch.testing.assert_close(r["running_mean"], single.running_mean)
        torch.testing.assert_close(r["running_var"], single.running_var)
