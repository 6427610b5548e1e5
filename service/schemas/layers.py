"""Allow-list of `torch.nn` layers that the `layers` model source may build, with their keywords.

Static on purpose: validating a request must not import torch, and a class that is not named here
can never be reached from a request.
"""

_CONV = {
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
}
_POOL = {"kernel_size", "stride", "padding", "dilation", "ceil_mode"}
_AVGPOOL = {"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"}
_ADAPTIVE = {"output_size"}
_NORM = {"num_features", "eps", "momentum", "affine", "track_running_stats"}
_RNN = {
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "dropout",
    "bidirectional",
}
_ACT: set[str] = {"inplace"}

LAYER_TYPES: dict[str, set[str]] = {
    "Linear": {"in_features", "out_features", "bias"},
    "Bilinear": {"in1_features", "in2_features", "out_features", "bias"},
    "Conv1d": _CONV,
    "Conv2d": _CONV,
    "Conv3d": _CONV,
    "ConvTranspose1d": _CONV | {"output_padding"},
    "ConvTranspose2d": _CONV | {"output_padding"},
    "MaxPool1d": _POOL,
    "MaxPool2d": _POOL,
    "MaxPool3d": _POOL,
    "AvgPool1d": _AVGPOOL,
    "AvgPool2d": _AVGPOOL,
    "AvgPool3d": _AVGPOOL,
    "AdaptiveAvgPool1d": _ADAPTIVE,
    "AdaptiveAvgPool2d": _ADAPTIVE,
    "AdaptiveMaxPool2d": _ADAPTIVE,
    "BatchNorm1d": _NORM,
    "BatchNorm2d": _NORM,
    "BatchNorm3d": _NORM,
    "InstanceNorm2d": _NORM,
    "GroupNorm": {"num_groups", "num_channels", "eps", "affine"},
    "LayerNorm": {"normalized_shape", "eps", "elementwise_affine", "bias"},
    "ReLU": _ACT,
    "ReLU6": _ACT,
    "LeakyReLU": {"negative_slope", "inplace"},
    "ELU": {"alpha", "inplace"},
    "SELU": _ACT,
    "GELU": {"approximate"},
    "SiLU": _ACT,
    "Mish": _ACT,
    "Hardswish": _ACT,
    "Sigmoid": set(),
    "Tanh": set(),
    "Softmax": {"dim"},
    "LogSoftmax": {"dim"},
    "Identity": set(),
    "Dropout": {"p", "inplace"},
    "Dropout2d": {"p", "inplace"},
    "Flatten": {"start_dim", "end_dim"},
    "Unflatten": {"dim", "unflattened_size"},
    "Embedding": {
        "num_embeddings",
        "embedding_dim",
        "padding_idx",
        "max_norm",
        "scale_grad_by_freq",
        "sparse",
    },
    "RNN": _RNN | {"nonlinearity"},
    "LSTM": _RNN | {"proj_size"},
    "GRU": _RNN,
    "TransformerEncoderLayer": {
        "d_model",
        "nhead",
        "dim_feedforward",
        "dropout",
        "activation",
        "layer_norm_eps",
        "batch_first",
        "norm_first",
        "bias",
    },
    "MultiheadAttention": {"embed_dim", "num_heads", "dropout", "bias", "batch_first"},
    "Upsample": {"size", "scale_factor", "mode", "align_corners"},
    "PixelShuffle": {"upscale_factor"},
    "ZeroPad2d": {"padding"},
}
