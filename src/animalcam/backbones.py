"""Registry of backbones: how to build each, how it expects its input, where Grad-CAM looks.

Adding a ``keras.applications`` model means adding one :class:`Backbone` entry (and
checking its layer names with ``tests/test_modeling.py``, which builds every entry).
Nothing here imports TensorFlow at module load (params validation uses the names only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    name: str
    application: str  # attribute of keras.applications that builds it
    # Preprocessing it was pretrained with, as understood by animalcam.layers.Preprocess:
    # "caffe" (BGR, ImageNet mean subtracted), "tf" ([-1, 1]), "torch", or "none"
    # (the model carries its own preprocessing, as EfficientNetV2 and ConvNeXt do).
    preprocessing: str
    # Grad-CAM's default target layer. None: the backbone's output feature map (the
    # layer feeding the "pool" layer), for backbones whose last 4-D layer has no stable
    # name (see animalcam.gradcam_target.find_target_layer).
    last_conv_layer: str | None
    # Layer-name prefixes of its blocks, bottom to top, for "unfreeze the top N blocks":
    # the first layer named with the N-th prefix from the top and every backbone layer
    # after it become trainable (so a trailing "top_conv" goes with the top block).
    blocks: tuple[str, ...]
    # Root mean square of the pooled backbone features under the backbone's own
    # preprocessing (100 sample images). The model divides the features by it
    # (a fixed "feature_scale" layer before the head), so that a fresh head starts
    # with unit-scale logits and Adam's steps move its output as they would on
    # unit inputs (measured in docs/fine-tuning.md). 1.0: already near unit scale.
    feature_rms: float = 1.0


BACKBONES: dict[str, Backbone] = {
    # The reference study's backbone: 14.7 M parameters, 13 convolutions in 5 blocks.
    "vgg16": Backbone(
        name="vgg16",
        application="VGG16",
        preprocessing="caffe",
        last_conv_layer="block5_conv3",
        blocks=("block1_", "block2_", "block3_", "block4_", "block5_"),
        feature_rms=10.0,  # Caffe-scale inputs (+-128) give large pooled features
    ),
    # 5.9 M parameters, far better ImageNet accuracy than VGG16; rescales and normalises
    # its [0, 255] input itself. Grad-CAM on the activation after the last 1x1 conv, the
    # usual choice for EfficientNets (top_conv itself is linear, before batch norm).
    "efficientnetv2b0": Backbone(
        name="efficientnetv2b0",
        application="EfficientNetV2B0",
        preprocessing="none",
        last_conv_layer="top_activation",
        blocks=("block1", "block2", "block3", "block4", "block5", "block6"),
    ),
    # 27.8 M parameters; normalises its [0, 255] input itself. Its last stage ends in a
    # residual add (an unnamed op) and, without the top, a layer norm that Keras names
    # automatically ("layer_normalization", "layer_normalization_1", ...), so Grad-CAM
    # resolves the target as "whatever feeds the pooling layer".
    "convnext_tiny": Backbone(
        name="convnext_tiny",
        application="ConvNeXtTiny",
        preprocessing="none",
        last_conv_layer=None,
        blocks=(
            "convnext_tiny_stage_0",
            "convnext_tiny_stage_1",
            "convnext_tiny_stage_2",
            "convnext_tiny_stage_3",
        ),
    ),
}
