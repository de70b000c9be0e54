"""BackdoorBench's names for models, datasets and attacks, and what they are in bdgrid.

Models. BackdoorBench builds its classifiers in ``generate_cls_model``
(SCLBD/BackdoorBench, ``utils/aggregate_block/model_trainer_generate.py``): ``preactresnet18`` is
its own ``models/preact_resnet.py`` (the same modules and state_dict keys as bdgrid's
``preact_resnet18``: conv1, layer1..4 of PreActBlocks with bn1/conv1/bn2/conv2 and a
``shortcut`` Sequential, linear); every other name is a torchvision constructor called with
``num_classes`` (``vgg19_bn`` is torchvision's ImageNet VGG: 7x7 adaptive pool and a
4096-4096 classifier, not bdgrid's CIFAR ``vgg19_bn`` with one 512 -> classes layer), and the
ViTs are ``Sequential(Resize(224, 224), vit)``. So ``preactresnet18`` maps onto bdgrid's own
architecture and the torchvision ones onto architectures registered here under ``bb_<name>``,
built the way BackdoorBench builds them (no pretrained weights are fetched: the record's
state_dict replaces them).

Records written by bdgrid for an architecture BackdoorBench has no counterpart for carry
``model_name = "bdgrid.<arch>"`` (BackdoorBench cannot build those; bdgrid reads them back).

Datasets: BackdoorBench's ``cifar10``, ``cifar100``, ``gtsrb``, ``mnist`` are bdgrid's names;
``tiny`` is ``tiny-imagenet`` (``utils/aggregate_block/dataset_and_transform_generate.py``).
Attacks: BackdoorBench's script names (``attack/*.py``, the ``attack`` value of
``config/attack/*/default.yaml``) -> bdgrid's attack names.
"""
from __future__ import annotations

import torch

from defense.models import MODELS, register_model

# BackdoorBench model_name -> bdgrid architecture
BB_TO_ARCH = {"preactresnet18": "preact_resnet18"}
# torchvision constructors BackdoorBench calls as models.<name>(num_classes=...)
_TORCHVISION = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg19", "vgg19_bn", "alexnet",
                "densenet121", "densenet161", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                "efficientnet_b3", "convnext_tiny", "resnext50_32x4d", "wide_resnet50_2")
_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")
BDGRID_PREFIX = "bdgrid."

BB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb", "mnist": "mnist",
               "tiny": "tiny-imagenet"}
BB_ATTACKS = {"badnet": "badnets", "blended": "blended", "bpp": "bpp", "inputaware": "inputaware", "lc": "lc",
              "lf": "lf", "sig": "sig", "ssba": "ssba", "trojannn": "trojannn", "wanet": "wanet"}


def _torchvision_builder(name: str):
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        import torchvision.models as tvm

        if in_channels != 3:
            raise ValueError(f"BackdoorBench's {name} takes 3-channel images, got {in_channels}")
        return getattr(tvm, name)(weights=None, num_classes=num_classes)

    build.__doc__ = f"torchvision {name}(num_classes), as BackdoorBench's generate_cls_model builds it."
    return build


def _vit_builder(name: str):
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        import torchvision.models as tvm
        from torchvision.transforms import Resize

        vit = getattr(tvm, name)(weights=None)
        vit.heads.head = torch.nn.Linear(vit.heads.head.in_features, num_classes)
        # BackdoorBench wraps the ViT behind a resize to 224 (keys "1.<...>")
        return torch.nn.Sequential(Resize((224, 224)), vit)

    build.__doc__ = f"torchvision {name} behind Resize(224), its head replaced, as BackdoorBench builds it."
    return build


for _n in _TORCHVISION + _VITS:
    BB_TO_ARCH[_n] = f"bb_{_n}"
    if f"bb_{_n}" not in MODELS:
        register_model(f"bb_{_n}", backdoorbench=_n)(_vit_builder(_n) if _n in _VITS else _torchvision_builder(_n))

ARCH_TO_BB = {v: k for k, v in BB_TO_ARCH.items()}


def arch_for_model_name(model_name: str) -> str | None:
    """bdgrid's architecture for a record's ``model_name``; None when bdgrid has none."""
    if model_name in BB_TO_ARCH:
        return BB_TO_ARCH[model_name]
    if isinstance(model_name, str) and model_name.startswith(BDGRID_PREFIX):
        arch = model_name[len(BDGRID_PREFIX):]
        return arch if arch in MODELS else None
    return None


def model_name_for_arch(arch: str) -> str:
    """The ``model_name`` a record of bdgrid's ``arch`` carries (BackdoorBench's name when it has one)."""
    return ARCH_TO_BB.get(arch, BDGRID_PREFIX + arch)


def dataset_for_clean_data(clean_data: str) -> str | None:
    from defense.data import DATASETS

    name = BB_DATASETS.get(clean_data, clean_data)
    return name if name in DATASETS else None


def dataset_to_bb(dataset: str) -> str:
    inv = {v: k for k, v in BB_DATASETS.items()}
    return inv.get(dataset, dataset)
