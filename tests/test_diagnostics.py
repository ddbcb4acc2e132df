"""phi's channel scale per site (metaperturb.channel_scales) and the warning about closed sites."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import metaperturb
from metaperturb import ClosedSiteWarning, StrengthScheduler, channel_scales
from metaperturb.phi import expected_softplus
from metaperturb.train.metrics import site_scales


def plain_net() -> nn.Sequential:
    def unit(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    torch.manual_seed(0)
    return nn.Sequential(
        *unit(3, 8), *unit(8, 8), nn.MaxPool2d(2), *unit(8, 16), *unit(16, 16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def test_channel_scales_are_the_scales_the_sites_apply_in_eval() -> None:
    """With phi's noise kernels at zero, z's mean is the same everywhere, so an eval-mode site
    multiplies channel c by ``(s_c * E[z] - 1) * strength + 1``: s can be read off its output."""
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    controller = metaperturb.get_controller(model)
    with torch.no_grad():
        for op in (controller.phi.noise_in, controller.phi.noise_out):
            op.self_weight.zero_()
            op.mean_weight.zero_()
        for _ in range(3):  # running statistics away from their initial values
            model(torch.randn(8, 3, 16, 16) * 3)
    model.eval()
    metaperturb.set_strength(model, 0.7)
    seen: dict[str, list[torch.Tensor]] = {}
    for name in controller.site_names:
        module = model.get_submodule(name)
        module.register_forward_hook(
            lambda m, a, out, name=name: seen.setdefault(name, []).append(out.clone()),
            prepend=True,
        )
        module.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out))
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))
    mean_z = float(expected_softplus(torch.zeros(())))
    scales = channel_scales(model)
    assert list(scales) == controller.site_names and len(scales) >= 3
    for name, (before, after) in seen.items():
        live = before.sum((0, 2, 3)) > 0  # a channel the ReLU zeroed everywhere shows nothing
        assert live.sum() >= len(live) // 2
        gain = after.sum((0, 2, 3))[live] / before.sum((0, 2, 3))[live]
        applied = ((gain - 1) / 0.7 + 1) / mean_z
        torch.testing.assert_close(scales[name][live], applied, atol=2e-4, rtol=0)
    # The per-site means every reader of s uses (metrics log, evaluation runs, the warning).
    means = metaperturb.diagnostics.mean_channel_scales(model)
    assert means == pytest.approx({name: float(s.mean()) for name, s in scales.items()})
    assert means == site_scales(model)


def _close_last_site(model: nn.Module) -> str:
    """phi*'s s falls as the variance of its scale maps grows: make it huge at the last site."""
    controller = metaperturb.get_controller(model)
    controller.sites[-1].running_var.fill_(1_000.0)  # type: ignore[operator]
    return controller.site_names[-1]


def test_the_scheduler_records_the_last_check_that_found_a_site_closed() -> None:
    """A site that closes and reopens keeps its first and last closed steps: the last tells
    whether a rule waiting for a strength would have switched it off (reuse.trains_as)."""
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    controller = metaperturb.get_controller(model)
    healthy = controller.sites[-1].running_var.clone()  # type: ignore[union-attr]
    scheduler = StrengthScheduler(model, total_steps=100, check_every=5, on_closed_site="warn")
    name = _close_last_site(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedSiteWarning)
        for _ in range(10):
            scheduler.step()
    controller.sites[-1].running_var.copy_(healthy)  # type: ignore[union-attr]
    for _ in range(10):
        scheduler.step()
    assert scheduler.closed == {name: 5} and scheduler.last_closed == {name: 10}
    assert scheduler.state_dict()["last_closed"] == {name: 10}


def test_the_scheduler_warns_once_about_a_closed_site() -> None:
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    assert not metaperturb.diagnostics.closed_sites(model)  # phi* on fresh statistics
    scheduler = StrengthScheduler(model, total_steps=100, check_every=5, on_closed_site="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            scheduler.step()
        assert not caught
        name = _close_last_site(model)
        for _ in range(20):
            scheduler.step()
    assert [w.category for w in caught] == [ClosedSiteWarning]
    assert caught[0].filename == __file__  # it names the line that called step()
    message = str(caught[0].message)
    assert "step 10" in message and f"exclude={[name]!r}" in message
    assert metaperturb.diagnostics.closed_sites(model).keys() == {name}
    assert scheduler.closed == {name: 10} and scheduler.excluded == {}
    assert scheduler.last_closed == {name: 25}  # still closed at every check since
    # A resumed run remembers the site it warned about, and when.
    resumed = StrengthScheduler(model, total_steps=100, check_every=5, on_closed_site="warn")
    resumed.load_state_dict(scheduler.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):  # a check at step 30: the site is still closed
            resumed.step()
    assert resumed.closed == {name: 10} and resumed.closed_complete
    assert resumed.last_closed == {name: 30}
    # One saved before the record existed cannot say what closed before it was saved.
    older = {
        k: v
        for k, v in scheduler.state_dict().items()
        if k not in ("closed", "closed_complete", "last_closed")
    }
    resumed.load_state_dict(older)
    assert resumed.closed == {} and not resumed.closed_complete
    assert resumed.last_closed is None  # saved past a check, before the record existed
    # In "exclude" mode it can: every site that closed was switched off, and is in `excluded`.
    excluding = StrengthScheduler(model, total_steps=100, check_every=5)
    excluding.load_state_dict({**older, "excluded": {name: 10}})
    assert excluding.closed == {name: 10} and excluding.closed_complete


def test_the_check_can_be_turned_off_and_rejects_a_negative_period() -> None:
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    _close_last_site(model)
    scheduler = StrengthScheduler(model, total_steps=100, check_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(200):
            scheduler.step()
    with pytest.raises(ValueError, match="check_every"):
        StrengthScheduler(model, total_steps=100, check_every=-1)


def test_a_site_whose_statistics_turned_nan_counts_as_closed() -> None:
    """NaN compares false with everything: without care, poisoned statistics would pass the
    check that exists to catch a site passing nothing."""
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    controller = metaperturb.get_controller(model)
    controller.sites[0].running_mean.fill_(float("nan"))  # type: ignore[operator]
    closed = metaperturb.diagnostics.closed_sites(model)
    assert closed.keys() == {controller.site_names[0]}
    assert metaperturb.diagnostics.closed_among(
        {"a": float("nan"), "b": 0.3, "c": 0.001}
    ).keys() == {
        "a",
        "c",
    }


def test_exclude_mode_switches_a_closing_site_off_and_only_it() -> None:
    """The site passes its features unchanged from that step on, in training and in eval; the
    others still perturb; the scheduler records the step and resumes it."""
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    controller = metaperturb.get_controller(model)
    scheduler = StrengthScheduler(model, total_steps=100, check_every=5)  # the default
    assert scheduler.on_closed_site == "exclude"
    name = _close_last_site(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            scheduler.step()
    assert [w.category for w in caught] == [ClosedSiteWarning]
    assert "step 5" in str(caught[0].message) and "switched off there" in str(caught[0].message)
    assert scheduler.excluded == scheduler.closed == {name: 5}
    assert controller.excluded_sites == {len(controller.site_names) - 1}
    # Its frozen s is still ~0, but a site that passes its features whole is not closed.
    assert metaperturb.diagnostics.mean_channel_scales(model)[name] < 0.01
    assert not metaperturb.diagnostics.closed_sites(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for site in controller.site_names:
        module = model.get_submodule(site)
        module.register_forward_hook(
            lambda m, a, out, site=site: seen.__setitem__(site, (out.clone(), out)), prepend=True
        )
        module.register_forward_hook(
            lambda m, a, out, site=site: seen.__setitem__(site, (seen[site][0], out))
        )
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            model(torch.randn(4, 3, 16, 16))
        for site, (before, after) in seen.items():
            assert torch.equal(before, after) == (site == name), (mode, site)
    resumed = StrengthScheduler(model, total_steps=100, on_closed_site="exclude")
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.excluded == {name: 5}
    with pytest.raises(ValueError, match="on_closed_site"):
        StrengthScheduler(model, total_steps=100, on_closed_site="drop")  # type: ignore[arg-type]


def test_exclude_from_waits_for_a_strength_and_spares_a_site_that_reopens() -> None:
    """phi*'s WRN-28-2 site closed at step 200 and reopened by step 1,750: with ``exclude_from``
    a closed site is only warned about until the strength gets there, then switched off if it is
    still closed."""
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    controller = metaperturb.get_controller(model)
    # Full strength at step 40, half at step 20; a check every 5 steps.
    scheduler = StrengthScheduler(model, total_steps=100, check_every=5, exclude_from=0.5)
    last = controller.sites[-1]
    healthy = last.running_var.clone()  # type: ignore[union-attr]
    name = _close_last_site(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            scheduler.step()
        last.running_var.copy_(healthy)  # type: ignore[union-attr,operator]  # reopens
        for _ in range(10):  # the check at step 20 (half strength) finds it open
            scheduler.step()
        assert scheduler.closed == {name: 5} and scheduler.excluded == {}
        assert not controller.excluded_sites
        _close_last_site(model)  # closes again, past half strength: switched off at step 25
        for _ in range(5):
            scheduler.step()
    assert [w.category for w in caught] == [ClosedSiteWarning, ClosedSiteWarning]
    assert "step 5" in str(caught[0].message) and "strength reaches 0.5" in str(caught[0].message)
    assert "step 25" in str(caught[1].message) and "switched off" in str(caught[1].message)
    assert scheduler.closed == {name: 5} and scheduler.excluded == {name: 25}
    assert controller.excluded_sites == {len(controller.site_names) - 1}
    resumed = StrengthScheduler(model, total_steps=100, exclude_from=0.5)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.closed == {name: 5} and resumed.excluded == {name: 25}
    with pytest.raises(ValueError, match="exclude_from"):
        StrengthScheduler(model, total_steps=100, exclude_from=1.5)
    with pytest.raises(ValueError, match="needs on_closed_site='exclude'"):
        StrengthScheduler(model, total_steps=100, on_closed_site="warn", exclude_from=0.5)


def test_excluded_sites_travel_with_the_state_dict_and_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    names = metaperturb.get_controller(model).site_names
    metaperturb.exclude_sites(model, [names[1]])
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert metaperturb.get_controller(fresh).excluded_sites == {1}
    assert f"excluded=['{names[1]}']" in repr(fresh)
    # A plain host's checkpoint (no MetaPerturb keys) loads strictly and changes nothing.
    plain = plain_net().state_dict()
    fresh.load_state_dict(plain)
    assert metaperturb.get_controller(fresh).excluded_sites == {1}
    with pytest.raises(metaperturb.NoSitesError, match="not sites of this model"):
        metaperturb.exclude_sites(fresh, ["0", "nope"])


def test_a_checkpoint_from_other_sites_is_refused_by_name() -> None:
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    state = model.state_dict()
    state["metaperturb._extra_state"] = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="wrapped with other sites"):
        model.load_state_dict(state)


def _rank_excludes(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
        if rank == 0:  # each rank's statistics have seen only its own batches
            _close_last_site(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClosedSiteWarning)
            # Warned about on every rank as well: the two settings see the same closed sites.
            warned = metaperturb.diagnostics.warn_closed_sites(model, step=5)
            names = metaperturb.diagnostics.exclude_closed_sites(model, step=5)
        Path(out, f"rank{rank}").write_text(",".join(names))
        Path(out, f"warned{rank}").write_text(",".join(warned))
    finally:
        dist.destroy_process_group()


def test_under_distributed_a_site_closed_on_one_rank_is_switched_off_on_every_rank(
    tmp_path: Path,
) -> None:
    """Otherwise the replicas would become different networks (and, in warn mode, an empty
    record of closed sites on one rank would not mean that none closed)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_excludes, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    last = metaperturb.get_controller(
        metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    ).site_names[-1]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == last
        assert (tmp_path / f"warned{rank}").read_text() == last
