"""Whether a saved result or checkpoint answers a run's settings: a sweep reuses what it may and
refuses, with the fix, what was made with other settings or other phi numbers under the same id."""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from ..annealing import linear_ramp
from ..hub import load_default_phi, load_phi
from .config import TransferConfig, closed_site_suffix

__all__ = [
    "check_same_phi",
    "check_same_settings",
    "closed_site_twin",
    "current_fingerprint",
    "find_equivalent_result",
    "trains_as",
]


#: Settings that do not change what a run computes: they may differ when a result is reused.
_NEUTRAL_SETTINGS = frozenset({"device", "checkpoint_every", "data_root", "channels_last"})


def _portable(settings: dict[str, Any]) -> dict[str, Any]:
    """Paths by their last part, as the run id has them: a custom target's data folder, phi's
    folder and the fine-tuning weights (paths differ between machines; phi itself is compared by
    its fingerprint). A setting the file predates (added to :class:`TransferConfig` later)
    counts as its default, which is what that run used."""
    defaults = {
        f.name: json.loads(
            json.dumps(f.default if f.default_factory is MISSING else f.default_factory())
        )
        for f in fields(TransferConfig)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    settings = {**defaults, **settings}
    target = settings.get("target")
    if isinstance(target, dict) and "data" in target:
        settings = {**settings, "target": {**target, "data": Path(str(target["data"])).name}}
    for key in ("phi", "init"):
        if settings.get(key) is not None:
            settings = {**settings, key: Path(str(settings[key])).name}
    return settings


def current_fingerprint(config: TransferConfig) -> str | None:
    """The fingerprint of the phi ``config.phi`` names now (``None``: no phi)."""
    if config.phi is None:
        return None
    phi = load_default_phi() if config.phi == "default" else load_phi(config.phi)
    return phi.fingerprint()


def check_same_phi(saved: str | None, current: str | None, path: Path) -> None:
    """Refuse a result or checkpoint made with other phi numbers than the run's phi has now
    (the bundled phi* or a folder replaced since)."""
    if saved is not None and current is not None and saved != current:
        raise ValueError(
            f"{path} was made with another phi than this run's (phi fingerprint {saved[:12]}..., "
            f"now {current[:12]}...). Delete the file to redo the run with this phi, or use "
            "another --output-dir."
        )


#: Settings read only after training: a checkpoint of the training serves any of them.
_EVALUATION_SETTINGS = frozenset({"mc_samples", "eval_modes", "save_weights"})


def _evaluation_covered(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a result made with ``saved`` settings already holds every evaluation that
    ``current`` asks for: the same training scored more ways (say MC-100 besides the default)
    answers a run that asks for fewer, so a sweep does not train that network again."""
    return (
        set(current.get("mc_samples") or []) <= set(saved.get("mc_samples") or [])
        and bool(saved.get("eval_modes")) >= bool(current.get("eval_modes"))
        and bool(saved.get("save_weights")) >= bool(current.get("save_weights"))
    )


def _setting_differences(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    skip: frozenset[str] = frozenset(),
    evaluations: bool = True,
) -> list[str]:
    """What keeps a result or checkpoint with ``saved`` settings from answering ``current``
    (both portable dicts): a differing training setting other than those in ``skip``, and, with
    ``evaluations``, an evaluation the result lacks."""
    ignored = _NEUTRAL_SETTINGS | _EVALUATION_SETTINGS | skip
    differences = [
        f"{key}: file has {saved.get(key)!r}, asked {value!r}"
        for key, value in current.items()
        if key not in ignored and key in saved and saved[key] != value
    ]
    if evaluations and not _evaluation_covered(saved, current):
        differences += [
            f"{key}: file has {saved.get(key)!r}, asked {current.get(key)!r}"
            for key in sorted(_EVALUATION_SETTINGS)
            if saved.get(key) != current.get(key)
        ]
    return differences


def check_same_settings(
    saved: dict[str, Any], config: TransferConfig, path: Path, *, training_only: bool = False
) -> None:
    """Refuse to reuse a result or checkpoint made with other settings under the same run id
    (the id names the main settings only; lr, batch size and the rest live in the file).
    ``training_only``: a checkpoint, which the evaluation settings do not concern."""
    current = _portable(json.loads(json.dumps(asdict(config))))  # as the file holds them
    differences = _setting_differences(_portable(saved), current, evaluations=not training_only)
    if differences:
        raise ValueError(
            f"{path} was made with other settings ({'; '.join(differences)}). Use another "
            "--output-dir for these settings, or delete the file to redo the run."
        )


def _setting(on_closed_site: str, exclude_from: float | None) -> tuple[str, float]:
    """A closed-site setting as compared: "warn" waits for nothing."""
    return on_closed_site, float(exclude_from or 0.0) if on_closed_site == "exclude" else 0.0


def _saved_setting(config: dict[str, Any]) -> tuple[str, float]:
    return _setting(str(config.get("on_closed_site", "warn")), config.get("exclude_closed_from"))


def _closed_up_to(result: dict[str, Any]) -> float | None:
    """The highest strength at which a check of ``result``'s run found a site closed: -1 if
    none ever did; ``None`` when the result cannot say. Results older than ``closed_sites``
    say "none" only when they switched sites off for closing (then ``excluded_sites`` lists
    every site that closed); results older than ``closed_sites_last`` only when none closed."""
    config = result.get("config") or {}
    closed = result.get("closed_sites")
    if closed is None:
        none = config.get("on_closed_site") == "exclude" and result.get("excluded_sites") == {}
        return -1.0 if none else None
    if not closed:
        return -1.0
    last = result.get("closed_sites_last")
    if not last:
        return None
    steps, ramp = int(config["steps"]), float(config.get("ramp_fraction", 0.4))
    return max(linear_ramp(step, steps, ramp) for step in last.values())


def trains_as(result: dict[str, Any], on_closed_site: str, exclude_from: float = 0.0) -> bool:
    """Whether the run of ``result`` trained the very network a run with these closed-site
    settings would have. The checks draw no random numbers, so two settings train the same
    network until one of them switches a site off. A run that switched nothing off acted as
    "warn" throughout, and as any rule that waits for a strength above that of every check
    that found a site closed: a run in which no site closed is the run of every setting, and
    one that waited for a strength and switched nothing off, the run of any rule that waits at
    least as long."""
    config = result.get("config")
    if not isinstance(config, dict):
        return False
    own, wanted = _saved_setting(config), _setting(on_closed_site, exclude_from)
    if own == wanted:
        return True
    closed_up_to = _closed_up_to(result)
    if closed_up_to is not None and closed_up_to < 0:  # no site closed
        return True
    if own[0] == "exclude" and result.get("excluded_sites") != {}:
        return False  # it switched a site off (or cannot say)
    if wanted[0] == "warn":
        return True
    if own[0] == "exclude" and wanted[1] >= own[1]:
        return True  # no site was closed at a check at strength own[1] or more
    return closed_up_to is not None and closed_up_to < wanted[1]


def closed_site_twin(
    result: dict[str, Any], on_closed_site: str, exclude_from: float = 0.0
) -> dict[str, Any] | None:
    """``result`` named as the run of another closed-site setting (its method, id and config),
    where :func:`trains_as` says it is that run too; else ``None`` (also for its own setting).
    Method and id are renamed in place, so a name a report gave the run (phi* for a candidate)
    stays."""
    saved = result.get("config")
    if not isinstance(saved, dict) or saved.get("phi") is None:
        return None
    wanted = _setting(on_closed_site, exclude_from)
    if _saved_setting(saved) == wanted or not trains_as(result, *wanted):
        return None
    suffix = closed_site_suffix(*wanted)

    def renamed(name: str) -> str:
        # The setting is the last of phi's in a method (TransferConfig.method) and so in an id.
        return re.sub(
            r"(metaperturb\[[^]]*?)(,exclude-closed(-from[0-9.e+-]+)?)?\]",
            lambda match: f"{match.group(1)}{suffix}]",
            name,
            count=1,
        )

    return {
        **result,
        "id": renamed(str(result.get("id", ""))),
        "method": renamed(str(result.get("method", ""))),
        "config": {**saved, "on_closed_site": wanted[0], "exclude_closed_from": wanted[1]},
    }


def find_equivalent_result(config: TransferConfig, output_dir: str | Path) -> Path | None:
    """A result in ``output_dir`` that answers ``config`` under another phi name or
    ``on_closed_site`` setting: same training settings, same phi numbers (fingerprint), and at
    least the evaluations ``config`` asks for. E.g. a phi* candidate evaluated before `select`
    installed it as the bundled phi*: the ``phi="default"`` run is that result, not a new one;
    and a run in which no site closed is the run of every closed-site setting
    (:func:`trains_as`)."""
    if config.phi is None:
        return None
    wanted = _portable(json.loads(json.dumps(asdict(config))))
    fingerprint = current_fingerprint(config)
    for path in sorted(Path(output_dir).glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or result.get("phi_fingerprint") != fingerprint:
            continue
        saved = result.get("config")
        answers = trains_as(result, config.on_closed_site, config.exclude_closed_from)
        skip = {"phi", "phi_name"} | (
            {"on_closed_site", "exclude_closed_from"} if answers else set()
        )
        if isinstance(saved, dict) and not _setting_differences(
            _portable(saved), wanted, skip=frozenset(skip)
        ):
            return path
    return None
