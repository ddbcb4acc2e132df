"""The Triton eval site (``METAPERTURB_TRITON=1``) computes what the PyTorch path computes.

Run on the CPU under Triton's interpreter, in a child process: the interpreter is chosen when
Triton is imported, so it cannot be switched on inside this one. What the interpreter cannot
check is speed on a GPU, which ``benchmarks/overhead.py`` measures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from metaperturb.phi import Perturbation
from metaperturb.site import SiteState, perturb

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)

CHILD = textwrap.dedent(
    """
    import json
    import timm
    import torch
    import metaperturb
    from metaperturb import _triton
    from metaperturb.phi import Perturbation
    from metaperturb.site import SiteState, perturb

    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    phi.freeze()
    errors = {}
    cases = [
        ((2, 3, 5, 7), torch.float32, False),
        ((2, 3, 5, 7), torch.float32, True),
        ((2, 4, 1, 6), torch.float32, False),
        ((1, 5, 33, 9), torch.float32, True),
        ((2, 3, 6, 6), torch.float16, False),
    ]
    for shape, dtype, channels_last in cases:
        state = SiteState(shape[1])
        state.running_mean.uniform_(0.0, 0.5)
        h = torch.randn(*shape).relu().to(dtype)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        assert _triton.usable(h)
        kwargs = dict(
            strength=torch.tensor(0.8), channel_ratio=0.5, spatial_ratio=torch.tensor(0.25),
            training=False, eval_mode="expectation", fused=False,
        )
        with torch.no_grad():
            reference = perturb(h, phi, state, **kwargs)
            import os
            os.environ["METAPERTURB_TRITON"] = "1"
            out = perturb(h, phi, state, **kwargs)
            del os.environ["METAPERTURB_TRITON"]
        key = f"{shape} {dtype} {'channels_last' if channels_last else 'nchw'}"
        errors[key] = {
            "max_error": (out.float() - reference.float()).abs().max().item(),
            "scale": reference.float().abs().max().item(),
            "dtype": str(out.dtype) == str(h.dtype),
            "layout": out.is_contiguous(memory_format=torch.channels_last) == channels_last
            or shape[2] * shape[3] == 1,
        }
    # A whole wrapped network in eval mode.
    model = timm.create_model("cifar_resnet20")
    metaperturb.wrap(model, phi=phi, input_size=(3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        import os
        os.environ["METAPERTURB_TRITON"] = "1"
        out = model(x)
    errors["resnet20"] = {
        "max_error": (out - reference).abs().max().item(),
        "scale": reference.abs().max().item(), "dtype": True, "layout": True,
    }
    print(json.dumps(errors))
    """
)


def test_triton_eval_site_matches_the_pytorch_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "METAPERTURB_NATIVE": "0"}
    env.pop("METAPERTURB_TRITON", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,  # the child's error output goes into the assertion message
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 6
    for case, result in errors.items():
        tolerance = 2e-3 if "float16" in case else 1e-5
        assert result["max_error"] <= tolerance * max(1.0, result["scale"]), (case, result)
        assert result["dtype"] and result["layout"], (case, result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_eval_site_on_a_gpu(dtype: torch.dtype, channels_last: bool) -> None:
    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    phi.freeze().cuda()
    state = SiteState(16).cuda()
    h = torch.randn(4, 16, 13, 11, device="cuda").relu()
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    kwargs = {
        "strength": torch.tensor(0.8),
        "channel_ratio": 0.5,
        "spatial_ratio": torch.tensor(0.25),
        "training": False,
    }
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        reference = perturb(h, phi, state, triton=False, **kwargs)
        out = perturb(h, phi, state, triton=True, **kwargs)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.float() - reference.float()).abs().max() <= tolerance * reference.abs().max()
