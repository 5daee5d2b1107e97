"""A small 3-D RetinaNet for CPU inference: MONAI's RetinaNet over a thin ResNet + FPN.

This is the architecture family of MONAI's ``lung_nodule_ct_detection`` bundle (ResNet backbone, FPN,
RetinaNet classification and box-regression heads) with the channel counts cut so that a CT study reads
in seconds on a CPU. MONAI's :func:`~monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor`
fixes the FPN at 256 channels (18 M parameters); here the same ``BackboneWithFPN`` is built with
``fpn_channels`` channels, replicating ``_resnet_fpn_extractor`` otherwise.

Feature map ``n`` (``n = 0`` for ``returned_layers[0]``, the last one being the extra max-pooled level) has
stride ``conv1_t_stride * 2 ** (returned_layers[n] - 1 + (1 - no_max_pool))`` relative to the input, per axis;
:func:`feature_map_strides` computes it, and the input must be divisible by the coarsest stride
(:func:`size_divisible`).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
from monai.networks.blocks.feature_pyramid_network import LastLevelMaxPool
from monai.networks.nets import resnet
from monai.utils import ensure_tuple_rep

__all__ = ["build_retinanet", "feature_map_strides", "size_divisible"]


def feature_map_strides(
    spatial_dims: int = 3,
    conv1_t_stride: int | Sequence[int] = (2, 2, 1),
    returned_layers: Sequence[int] = (1, 2),
    no_max_pool: bool = False,
) -> list[tuple[int, ...]]:
    """Stride, per axis, of every feature map the network outputs (finest first, extra pooled level last)."""
    conv1 = ensure_tuple_rep(conv1_t_stride, spatial_dims)
    pool = 1 if no_max_pool else 2
    strides = [tuple(int(c) * pool * 2 ** (layer - 1) for c in conv1) for layer in returned_layers]
    strides.append(tuple(2 * s for s in strides[-1]))  # LastLevelMaxPool: kernel 1, stride 2
    return strides


def size_divisible(
    spatial_dims: int = 3,
    conv1_t_stride: int | Sequence[int] = (2, 2, 1),
    returned_layers: Sequence[int] = (1, 2),
    no_max_pool: bool = False,
) -> tuple[int, ...]:
    """What each input axis must be divisible by: the coarsest feature map's stride."""
    return feature_map_strides(spatial_dims, conv1_t_stride, returned_layers, no_max_pool)[-1]


def build_retinanet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 1,
    num_anchors: int = 3,
    planes: Sequence[int] = (16, 32, 64, 128),
    layers: Sequence[int] = (1, 1, 1, 1),
    fpn_channels: int = 32,
    returned_layers: Sequence[int] = (1, 2),
    conv1_t_stride: int | Sequence[int] = (2, 2, 1),
    conv1_t_size: int | Sequence[int] = (7, 7, 7),
    no_max_pool: bool = False,
) -> RetinaNet:
    """A RetinaNet over a ResNet (basic blocks) + FPN with ``fpn_channels`` channels.

    ``num_anchors`` must equal the number of base anchor shapes of the anchor generator (model.yaml's
    ``detector.base_anchor_shapes``); ``len(returned_layers) + 1`` feature maps come out, which must equal
    the number of ``detector.feature_map_scales``. Layers after ``max(returned_layers)`` are not built into
    the feature extractor, so their parameters do not exist.
    """
    if fpn_channels % 8:
        raise ValueError(f"fpn_channels must be a multiple of 8 (the heads' GroupNorm groups), got {fpn_channels}")
    returned_layers = [int(layer) for layer in returned_layers]
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be in [1, 4], got {returned_layers}")
    backbone = resnet.ResNet(
        block="basic",
        layers=list(layers),
        block_inplanes=list(planes),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_stride=conv1_t_stride,
        conv1_t_size=conv1_t_size,
        no_max_pool=no_max_pool,
        feed_forward=False,
    )
    # As monai.networks.blocks.backbone_fpn_utils._resnet_fpn_extractor, with all layers trainable and the
    # FPN width a parameter. Basic blocks have expansion 1, so layer k outputs planes[k - 1] channels.
    feature_extractor = BackboneWithFPN(
        backbone,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned_layers)},
        in_channels_list=[int(planes[k - 1]) for k in returned_layers],
        out_channels=fpn_channels,
        spatial_dims=spatial_dims,
        extra_blocks=LastLevelMaxPool(spatial_dims),
    )
    return RetinaNet(
        spatial_dims=spatial_dims,
        num_classes=num_classes,
        num_anchors=num_anchors,
        feature_extractor=feature_extractor,
        size_divisible=size_divisible(spatial_dims, conv1_t_stride, returned_layers, no_max_pool),
    )
