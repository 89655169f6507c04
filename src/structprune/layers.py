"""Layer kinds and their weights: what a Linear, a (grouped, 1-d) convolution, a BatchNorm and an attention module
look like to the rest of structprune. Torch only: every other module may import this one.

* kinds: :data:`CONVS`, :data:`LINEAR_LAYERS` (what may read a group's channels), :data:`WEIGHT_LAYERS` (what may
  make them), Hugging Face's transposed Linear (``Conv1D``), attention modules;
* weight views: a Linear's (out, in) matrix whatever its storage, a grouped conv's dense form, a BatchNorm as an
  affine map;
* in-place edits of a Linear's input or output features;
* a convolution's geometry and the unfolding of its input into rows (patches).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONVS = (nn.Conv1d, nn.Conv2d)
LINEAR_LAYERS = (nn.Linear, *CONVS)  # what may read a group's channels (a consumer)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d)
WEIGHT_LAYERS = (*LINEAR_LAYERS, *TRANSPOSED_CONVS)  # what may make them (a producer)
BATCHNORMS = nn.modules.batchnorm._BatchNorm

#: the attributes an attention module holds its head count in (Hugging Face's and others' spellings)
HEAD_COUNTS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "num_key_value_heads")


def is_transposed_linear(module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear layer whose weight is stored as (in, out)."""
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2)


def is_linear(module) -> bool:
    """An ``nn.Linear`` or a transposed one (:func:`is_transposed_linear`)."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module: nn.MultiheadAttention, or one that holds a head count."""
    return isinstance(module, nn.MultiheadAttention) or any(
        isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool)
        for attr in HEAD_COUNTS)


def weight_matrix(module: nn.Module) -> Tensor:
    """The (out, in) weight of a Linear, also of a transposed one (a view)."""
    return module.weight.T if is_transposed_linear(module) else module.weight


def rows_first(module: nn.Module, tensor: Tensor) -> Tensor:
    """A tensor shaped like ``module.weight`` (the weight, its gradient) with the output rows first (a transposed
    Linear's is (in, out), a transposed conv's (in, out, *kernel))."""
    if isinstance(module, TRANSPOSED_CONVS):
        return tensor.transpose(0, 1)
    return tensor.T if is_transposed_linear(module) else tensor


def out_features(module: nn.Module) -> int:
    """Output features (channels) of a Linear, a transposed Linear or a (transposed) conv."""
    if isinstance(module, TRANSPOSED_CONVS):
        return module.out_channels
    return module.weight.shape[1] if is_transposed_linear(module) else module.weight.shape[0]


def in_features(module: nn.Module) -> int:
    """Input features of a Linear or a transposed Linear (input channels per conv group of a conv)."""
    return int(module.weight.shape[0] if is_transposed_linear(module) else module.weight.shape[1])


def keep_output_features(layer: nn.Module, rows: Tensor) -> None:
    """Keep only output features ``rows`` of a Linear (or transposed Linear): weight rows and bias entries."""
    rows = rows.to(layer.weight.device)
    weight = layer.weight.detach()
    weight = weight[:, rows] if is_transposed_linear(layer) else weight[rows]
    layer.weight = nn.Parameter(weight.clone(), layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[rows].clone(), layer.bias.requires_grad)
    if is_transposed_linear(layer):
        layer.nf = len(rows)
    else:
        layer.out_features = len(rows)


def keep_input_features(layer: nn.Module, columns: Tensor) -> None:
    """Keep only input features ``columns`` of a Linear (or transposed Linear)."""
    columns = columns.to(layer.weight.device)
    weight = layer.weight.detach()
    weight = weight[columns] if is_transposed_linear(layer) else weight[:, columns]
    layer.weight = nn.Parameter(weight.clone(), layer.weight.requires_grad)
    if is_transposed_linear(layer):
        layer.nx = len(columns)
    else:
        layer.in_features = len(columns)


def dense_conv_weight(conv: nn.Module) -> Tensor:
    """A conv's weight as (out, in, *kernel), zeros between the conv groups of a grouped one (a copy then)."""
    weight = conv.weight.detach()
    groups = conv.groups
    if groups == 1:
        return weight
    out, block = weight.shape[0] // groups, weight.shape[1]
    dense = weight.new_zeros(weight.shape[0], block * groups, *weight.shape[2:])
    for g in range(groups):
        dense[g * out:(g + 1) * out, g * block:(g + 1) * block] = weight[g * out:(g + 1) * out]
    return dense


def grouped_blocks(dense: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`dense_conv_weight`: each conv group's block of a dense (out, in, *kernel) weight."""
    out, block = dense.shape[0] // groups, dense.shape[1] // groups
    return torch.cat([dense[g * out:(g + 1) * out, g * block:(g + 1) * block] for g in range(groups)])


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm as y = scale·x + shift: (γ/σ, β − γμ/σ)."""
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


def conv_geometry(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, dilation, padding) of a Conv2d, or of a Conv1d seen as a Conv2d over (1, L) inputs."""
    if isinstance(conv.padding, str):  # "same"/"valid": resolve to numbers
        padding = tuple((d * (k - 1)) // 2 if conv.padding == "same" else 0
                        for k, d in zip(conv.kernel_size, conv.dilation, strict=False))
    else:
        padding = tuple(conv.padding)
    if isinstance(conv, nn.Conv1d):  # one row of height 1: kernel, stride and dilation 1 there, no padding
        return (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation), (0, *padding)
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), padding


def as_2d(conv: nn.Module, x: Tensor) -> Tensor:
    """A conv's input as (N, C, H, W): a Conv1d's (N, C, L) as (N, C, 1, L)."""
    return x.unsqueeze(2) if isinstance(conv, nn.Conv1d) else x


def out_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """A convolution's output length along one axis of (padded) length ``size``."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def all_rows(module: nn.Module, x: Tensor, kind: str, token_mask: Tensor | None) -> Tensor:
    """Every row of a consumer's *whole* input (all its input features, not only a group's), flattened as
    the layer's weight is: (rows, C_in·K) patches of a conv (zero padding included), (rows, features) of a
    Linear (padding tokens, False in ``token_mask``, left out)."""
    if kind == "linear":
        return x[token_mask] if token_mask is not None else x.reshape(-1, x.shape[-1])
    kernel, stride, dilation, padding = conv_geometry(module)
    cols = nn.functional.unfold(as_2d(module, x), kernel, dilation=dilation, padding=padding,
                                stride=stride)  # (N, C·K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
