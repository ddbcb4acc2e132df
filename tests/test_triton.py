"""The Triton site (``METAPERTURB_TRITON=1``) computes what the PyTorch path computes.

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

needs_triton = pytest.mark.skipif(
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
    import os

    def eval_both_ways(h):  # the eval site (expectation): PyTorch path, Triton kernels
        state = SiteState(h.shape[1])
        state.running_mean.uniform_(0.0, 0.5)
        kwargs = dict(
            strength=torch.tensor(0.8), channel_ratio=0.5, spatial_ratio=torch.tensor(0.25),
            training=False, eval_mode="expectation", fused=False,
        )
        with torch.no_grad():
            reference = perturb(h, phi, state, **kwargs)
            os.environ["METAPERTURB_TRITON"] = "1"
            out = perturb(h, phi, state, **kwargs)
            del os.environ["METAPERTURB_TRITON"]
        return reference, out

    for shape, dtype, channels_last in cases:
        h = torch.randn(*shape).relu().to(dtype)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        assert _triton.usable(h)
        reference, out = eval_both_ways(h)
        key = f"{shape} {dtype} {'channels_last' if channels_last else 'nchw'}"
        errors[key] = {
            "max_error": (out.float() - reference.float()).abs().max().item(),
            "scale": reference.float().abs().max().item(),
            "dtype": str(out.dtype) == str(h.dtype),
            "layout": out.is_contiguous(memory_format=torch.channels_last) == channels_last
            or shape[2] * shape[3] == 1,
        }
    # The eval clamp (a clip below some outputs), and the authors' eval without it.
    for clip_in_eval in (True, False):
        phi.config.clip, phi.config.clip_in_eval = 1.5, clip_in_eval
        reference, out = eval_both_ways(torch.randn(2, 3, 5, 7).relu() * 3)
        errors[f"eval clip_in_eval={clip_in_eval}"] = {
            "max_error": (out - reference).abs().max().item(),
            "scale": reference.abs().max().item(),
            "dtype": bool(reference.max() <= 1.5) == clip_in_eval,
            "layout": True,
        }
    phi.config.clip, phi.config.clip_in_eval = 100.0, True
    # Training (and eval sampling): the same noise given, values and input gradients, the
    # clamp included (a clip below some outputs).
    for shape, channels_last, training, clip in [
        ((2, 3, 5, 7), False, True, 100.0),
        ((2, 3, 5, 7), True, True, 100.0),
        ((1, 5, 9, 6), True, True, 1.5),
        ((3, 2, 4, 4), False, False, None),
    ]:
        phi.config.clip = clip if clip is not None else 100.0
        h0 = torch.randn(*shape).relu() * 3
        if channels_last:
            h0 = h0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(shape)
        results = []
        for triton in (False, True):
            state = SiteState(shape[1])
            state.running_mean.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
            h = h0.detach().clone().requires_grad_(True)
            out = perturb(
                h, phi, state, strength=torch.tensor(0.8), channel_ratio=0.5,
                spatial_ratio=torch.tensor(0.25), training=training, eval_mode="sample",
                noise=noise, fused=False, triton=triton,
            )
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
            results.append((out.detach(), h.grad))
        key = f"train {shape} {'channels_last' if channels_last else 'nchw'} clip {clip}"
        errors[key] = {
            "max_error": max(
                (results[0][0] - results[1][0]).abs().max().item(),
                (results[0][1] - results[1][1]).abs().max().item(),
            ),
            "scale": results[0][1].abs().max().item(),
            "dtype": True,
            "layout": results[1][0].is_contiguous(memory_format=torch.channels_last)
            == channels_last,
        }
    phi.config.clip = 100.0
    # The eval kernel has no backward: an eval site whose input needs a gradient keeps the
    # PyTorch path, and the gradient arrives.
    grads, h0 = [], torch.rand(2, 3, 5, 5)
    for triton in (False, True):
        h = h0.clone().requires_grad_(True)
        perturb(
            h, phi, SiteState(3), strength=torch.tensor(0.8), channel_ratio=0.5,
            spatial_ratio=torch.tensor(0.25), training=False, fused=False, triton=triton,
        ).sum().backward()
        grads.append(h.grad)
    errors["eval with a gradient"] = {
        "max_error": (grads[0] - grads[1]).abs().max().item(), "scale": 1.0,
        "dtype": True, "layout": True,
    }
    # Drawn noise: fixed by torch.manual_seed, new at each call, N(0, 1): with mu = 0 (phi's
    # noise weights zero), s = 1 and strength 1, out / h = softplus(eps), whose mean is 0.806.
    zero = Perturbation().freeze()
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    h = torch.ones(8, 16, 16, 16)
    kwargs = dict(
        strength=torch.tensor(1.0), channel_ratio=0.5, spatial_ratio=torch.tensor(0.25),
        training=False, eval_mode="sample", fused=False, triton=True,
    )
    scale = torch.ones(16)
    from metaperturb import _triton as kernels
    with torch.no_grad():
        torch.manual_seed(5)
        first = kernels.sampled(h, zero.noise_kernels(), scale, torch.tensor(1.0), None)
        second = kernels.sampled(h, zero.noise_kernels(), scale, torch.tensor(1.0), None)
        torch.manual_seed(5)
        again = kernels.sampled(h, zero.noise_kernels(), scale, torch.tensor(1.0), None)
    errors["drawn noise"] = {
        "max_error": 0.0 if torch.equal(first, again) and not torch.equal(first, second) else 1.0,
        "scale": 1.0,
        "dtype": abs(first.mean().item() - 0.806) < 0.01,
        "layout": True,
    }
    # A whole wrapped network in eval mode.
    model = timm.create_model("cifar_resnet20")
    metaperturb.wrap(model, phi=phi, input_size=(3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        os.environ["METAPERTURB_TRITON"] = "1"
        out = model(x)
    errors["resnet20"] = {
        "max_error": (out - reference).abs().max().item(),
        "scale": reference.abs().max().item(), "dtype": True, "layout": True,
    }
    print(json.dumps(errors))
    """
)


@needs_triton
def test_triton_site_matches_the_pytorch_path() -> None:
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
    assert len(errors) == 14
    for case, result in errors.items():
        tolerance = 2e-3 if "float16" in case else 1e-5
        assert result["max_error"] <= tolerance * max(1.0, result["scale"]), (case, result)
        assert result["dtype"] and result["layout"], (case, result)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_triton_site_on_a_gpu(dtype: torch.dtype, channels_last: bool, training: bool) -> None:
    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    phi.freeze().cuda()
    h0 = torch.randn(4, 16, 13, 11, device="cuda").relu()
    if channels_last:
        h0 = h0.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(h0.shape, device="cuda")
    results = []
    for triton in (False, True):
        state = SiteState(16).cuda()
        h = h0.detach().clone().requires_grad_(training)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = perturb(
                h,
                phi,
                state,
                strength=torch.tensor(0.8),
                channel_ratio=0.5,
                spatial_ratio=torch.tensor(0.25),
                training=training,
                noise=noise,
                triton=triton,
            )
        if training:
            out.float().sum().backward()
        results.append((out.detach().float(), h.grad))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    reference, fast = results
    assert (fast[0] - reference[0]).abs().max() <= tolerance * reference[0].abs().max()
    if training:
        assert (fast[1] - reference[1]).abs().max() <= tolerance * reference[1].abs().max()


def test_asking_for_triton_without_it_warns_and_keeps_pytorch_ops() -> None:
    child = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["triton"] = None  # as if not installed
        import torch
        from metaperturb.phi import Perturbation
        from metaperturb.site import SiteState, perturb
        phi = Perturbation().freeze()
        h = torch.rand(2, 3, 4, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = perturb(
                h, phi, SiteState(3), strength=torch.tensor(1.0), channel_ratio=0.5,
                spatial_ratio=torch.tensor(0.25), training=False, fused=False,
            )
        print(out.shape == h.shape, any("Triton is not installed" in str(w.message) for w in caught))
        """
    )
    env = {**os.environ, "METAPERTURB_TRITON": "1"}
    done = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True"]
