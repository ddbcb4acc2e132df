"""The README.md model card that save_pretrained writes beside a phi: Hub metadata and usage."""

from __future__ import annotations

import json
import re

from ._serialization import CONFIG_NAME, FORMAT_VERSION, PROVENANCE_KEYS, UNKNOWN, WEIGHTS_NAME
from .phi import Perturbation

__all__ = ["model_card"]

_HUB_TAGS = ("metaperturb", "regularization", "pytorch", "image-classification")
# Plain YAML scalars that would not read back as strings.
_YAML_WORDS = frozenset({"null", "true", "false", "yes", "no", "on", "off", "y", "n"})
_CITATION = [
    "## Citation",
    "",
    "```bibtex",
    "@inproceedings{ryu2020metaperturb,",
    "  title={MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and Architectures},",
    "  author={Ryu, Jeongun and Shin, Jaewoong and Lee, Hae Beom and Hwang, Sung Ju},",
    "  booktitle={Advances in Neural Information Processing Systems},",
    "  year={2020}",
    "}",
    "```",
    "",
]


def model_card(
    phi: Perturbation,
    repo_id: str | None,
    provenance: str | None,
    license: str,
    revision: str | None = None,
) -> str:
    """The model card: YAML front matter for the Hub, usage, files, provenance and citation.

    Args:
        phi: The phi being saved; its ``config.metadata`` fills the provenance table.
        repo_id: The Hub repository the card is meant for, used in the usage example.
        provenance: Free text appended to the provenance section.
        license: The licence in the front matter.
        revision: The branch the card's folder is pushed to, in the usage example (``main``:
            none).
    """
    metadata = phi.config.metadata
    dataset = metadata.get("source_dataset", UNKNOWN)
    architecture = metadata.get("source_architecture", UNKNOWN)
    front = ["---", "library_name: metaperturb", f"license: {_yaml_str(license)}", "tags:"]
    front += [f"- {tag}" for tag in _HUB_TAGS]
    if dataset != UNKNOWN:
        front += ["datasets:", f"- {_yaml_str(dataset)}"]
    front.append("---")

    target = repo_id if repo_id is not None else "<org>/<name>"
    pinned = f', revision="{revision}"' if revision not in (None, "main") else ""
    config = {k: v for k, v in phi.config.to_dict().items() if k != "metadata"}
    rows = [("Source dataset", dataset), ("Source architecture", architecture)]
    rows += [(key, value) for key, value in sorted(metadata.items()) if key not in PROVENANCE_KEYS]
    rows += [(f"config.{key}", repr(value)) for key, value in config.items()]
    table = ["| | |", "| --- | --- |"] + [f"| {k} | {_cell(str(v))} |" for k, v in rows]
    body = [
        f"# MetaPerturb phi{f': {repo_id}' if repo_id else ''}",
        "",
        (
            "A meta-learned feature-perturbation function (phi) for "
            "[metaperturb](https://github.com/metaperturb/metaperturb), after MetaPerturb "
            "(Ryu, Shin, Lee and Hwang, NeurIPS 2020). phi has 82 parameters shared by every layer "
            "of every network: it multiplies each feature map by input-dependent noise scaled per "
            "channel, and regularizes a network trained from scratch on a new task. phi itself is "
            "frozen on the target task."
        ),
        "",
        "## Usage",
        "",
        "```python",
        "import metaperturb",
        "",
        f'model = metaperturb.wrap(model, phi="{target}"{pinned})',
        "```",
        "",
        'A local copy of this folder works too: `metaperturb.wrap(model, phi="path/to/folder")`.',
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_NAME}`: the 82 parameters (fp32); loaded strictly, never unpickled.",
        f"- `{CONFIG_NAME}`: the phi configuration (format version {FORMAT_VERSION}).",
        "",
        "## Provenance",
        "",
        *table,
        "",
    ]
    if provenance:
        body += [provenance.strip(), ""]
    return "\n".join([*front, "", *body, *_CITATION])


def _yaml_str(value: str) -> str:
    if re.fullmatch(r"[a-z][a-z0-9.-]*", value) and value not in _YAML_WORDS:
        return value
    # A JSON string literal is a valid YAML double-quoted scalar, whatever it contains.
    return json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
