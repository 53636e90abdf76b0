"""linear_token_logprobs' CPU backward when one of its tile workers fails.

The backward adds each vocabulary tile's dz @ W into dh in tile order (OrderedTurns in
csrc/cpu/linear_token_logprobs.cpp): a worker waits for the tiles before its own. If the worker holding an earlier
tile throws, the waiting ones must give up (not spin forever) and the caller must get the failing worker's error,
not the "abandoned" signal of a worker that merely stopped waiting. ALIGNFAST_TEST_FAIL_TILE=k makes tile k throw
before its turn. The calls run in a child process under a timeout, so a deadlock fails the test instead of hanging
the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from alignfast.ops._library import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("linear_token_logprobs", "cpu"),
                                reason="alignfast._C has no CPU kernel (extension not built)")

CHILD = textwrap.dedent("""
    import os
    import torch
    from alignfast.ops import linear_token_logprobs

    torch.set_num_threads(2)  # two tile workers: one fails, the other waits for its turn
    # N=64, H=64, V=4096, chunk_size=4: 2 workers (the work is 4x the minimum per worker), 32 tiles of 128 columns
    g = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(64, 64, generator=g)
    weight0 = torch.randn(4096, 64, generator=g) / 8
    tokens = torch.randint(0, 4096, (64,), generator=g)

    def grads(dtype):
        hidden = hidden0.to(dtype).clone().requires_grad_()
        weight = weight0.to(dtype).clone().requires_grad_()
        linear_token_logprobs(hidden, weight, tokens, chunk_size=4).sum().backward()
        return hidden.grad, weight.grad

    for dtype in (torch.float32, torch.bfloat16):
        clean = grads(dtype)
        for tile in (0, 1, 17, 31):
            os.environ["ALIGNFAST_TEST_FAIL_TILE"] = str(tile)
            try:
                grads(dtype)
            except RuntimeError as err:
                assert f"injected failure in tile {tile}" in str(err), (dtype, tile, str(err)[:300])
            else:
                raise AssertionError(f"{dtype} tile {tile}: the injected failure did not reach the caller")
            del os.environ["ALIGNFAST_TEST_FAIL_TILE"]
            # the next call starts clean: same gradients, bit for bit (dh is summed in tile order)
            again = grads(dtype)
            assert all(torch.equal(a, b) for a, b in zip(clean, again)), (dtype, tile)
        print("ok", dtype, flush=True)
""")


def test_a_failing_tile_worker_raises_its_error_and_no_worker_waits_forever():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "torch.float32", "ok", "torch.bfloat16"], proc.stdout
