"""params_paper.yaml: the paper's settings for a real run, one `cp` away from params.yaml.

It must stay a drop-in: the same keys as params.yaml (a key added to params.yaml and forgotten
here fails), every section loading into its stage's config, and exactly the documented settings
changed (PAPER_CHANGES, which the README's "Real data" section points to)."""
from __future__ import annotations

from pathlib import Path

import yaml

from eval.detection.schedule import PRESETS, DetectConfig
from eval.oknn import OknnConfig
from eval.probes import ProbesConfig
from pipeline.manifest import DataConfig
from pipeline.params import load_section
from pipeline.proposals import ProposalsConfig
from pipeline.sample import SampleConfig
from pipeline.shards import ShardsConfig
from pipeline.synth import SynthConfig
from train.pretrain import load_config, method_config

REPO = Path(__file__).resolve().parents[1]
PAPER, EMBEDDED = REPO / "params_paper.yaml", REPO / "params.yaml"

# What a real run changes, and why (the paper where it says, else its closest baseline's):
PAPER_CHANGES = {
    "detect_models",                                                    # detection of every model
    "data.coco_root", "data.openimages_root", "data.manifests", "data.generate",   # the real downloads
    "proposals.max_side",                                               # selective search at 500 px
    "loader.workers", "loader.views.size", "loader.views.small_size",   # 224 / 112 px views (paper)
    "pretrain.arch", "pretrain.roi_size", "pretrain.epochs",            # ResNet-50 C4, RoIAlign 14, 800 epochs
    "pretrain.base_lr", "pretrain.warmup_epochs", "pretrain.checkpoint_every", "pretrain.nproc_per_node", "pretrain.bf16_cpu",
    "pretrain.bn_splits", "pretrain.snapshot_steps",                    # MoCo v2's lr, 8 GPUs x 32
    *(f"methods.{m}.{k}" for m in ("d3ssl", "d3ssl_dc", "mocov2")
      for k in ("queue_size", "proj_bn", "momentum")),                  # MoCo v2's queue, head, momentum
    "oknn.min_size", "oknn.max_size", "oknn.workers",                   # COCO's 480 / 800 px
    "probes.pairs", "probes.objects", "probes.object_size", "probes.canvas", "probes.pool_size",
    "detect.preset", "detect.val_images",                               # Mask R-CNN R-C4 1x, all of val
}


def flat(doc, prefix: str = "") -> dict:
    """{'a.b.c': value} of a nested mapping (lists are values)."""
    out = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def test_the_paper_params_change_exactly_the_documented_settings():
    paper, embedded = flat(yaml.safe_load(PAPER.read_text())), flat(yaml.safe_load(EMBEDDED.read_text()))
    assert set(paper) == set(embedded), ("params_paper.yaml and params.yaml must hold the same keys: "
                                         f"{sorted(set(paper) ^ set(embedded))}")
    changed = {k for k in paper if paper[k] != embedded[k]}
    assert changed == PAPER_CHANGES, (f"undocumented: {sorted(changed - PAPER_CHANGES)}; "
                                      f"documented but equal: {sorted(PAPER_CHANGES - changed)}")


def test_every_section_of_the_paper_params_loads_into_its_stage():
    doc = yaml.safe_load(PAPER.read_text())
    for cls, section in ((SynthConfig, "synth"), (SampleConfig, "sample"), (ProposalsConfig, "proposals"),
                         (ShardsConfig, "shards"), (DataConfig, "data"), (OknnConfig, "oknn"),
                         (ProbesConfig, "probes"), (DetectConfig, "detect")):
        load_section(cls, section, PAPER)
    cfg = load_config(PAPER)
    assert (cfg.arch, cfg.roi_size, cfg.epochs, cfg.loader.views.size) == ("resnet50", 14, 800, 224)
    assert cfg.loader.batch_size * cfg.nproc_per_node == 256                 # MoCo v2's batch
    for name in doc["models"]:
        if name in doc["methods"]:
            assert method_config(name, PAPER).queue_size in (1, 65536)
    assert set(doc["detect_models"]) <= set(doc["models"]) and doc["seeds"]
    assert load_section(DetectConfig, "detect", PAPER).preset in PRESETS
