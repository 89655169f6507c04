"""The data the pipeline passes around about a group of coupled channels: its :class:`Group` (channels that
must be removed together), the layers that make them (:class:`Producer`) and the layers that read them
(:class:`Consumer`), resolved against the model as it is now; and :func:`write_consumer_weights`, which writes a
selection's replacement weights into the consumers before a removal.

Plain dataclasses over torch modules: importing this module pulls in neither Torch-Pruning nor any graph code, so
every graph (:mod:`structprune.graph`, :mod:`structprune.attention`) and every reader of groups shares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import StructPruneError
from .layers import CONVS, dense_conv_weight, grouped_blocks, is_transposed_linear, weight_matrix


@dataclass
class Producer:
    """A layer whose outputs are the group's channels; ``channel_index[c]`` are its output rows for channel c."""

    name: str
    module: nn.Module
    channel_index: Tensor  # (channels, rows_per_channel)


@dataclass
class Consumer:
    """A Conv1d/Conv2d (grouped ones too) or Linear (or Hugging Face's transposed Conv1D) that reads the group's
    channels.

    ``channel_index[c]`` are the consumer's input features fed by group channel c: its input channels for a
    conv (one; one per conv group where grouped convolutions tie channels together, see :attr:`Group.members`),
    ``H*W`` for a Linear after a Flatten. ``output_scale`` is γ/σ and ``output_shift``
    β − γμ/σ of a BatchNorm that directly follows the consumer (ones and zeros when there is none),
    so that f includes that BatchNorm.
    """

    name: str
    module: nn.Module
    channel_index: Tensor  # (channels, features_per_channel)
    output_scale: Tensor
    output_shift: Tensor
    normalized: bool = False  # whether those come from a BatchNorm
    #: that BatchNorm when nothing else reads the consumer's output: a constant added to the output of a consumer
    #: without bias (a refit's bias change) goes into its running mean
    batchnorm: nn.Module | None = None

    @property
    def grouped(self) -> bool:
        """A grouped convolution: its weight is zero between conv groups, by structure."""
        return self.kind == "conv" and self.module.groups > 1

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.module, CONVS) else "linear"

    def canonical_weight(self) -> Tensor:
        """The weight as (out, channels, taps): taps are kernel positions (conv; of each of a channel's input
        channels in turn, where grouped convolutions make several go together) or features (linear)."""
        if self.kind == "conv":
            weight = dense_conv_weight(self.module)
            kept = weight[:, self.channel_index.reshape(-1)]
            return kept.reshape(weight.shape[0], self.channel_index.shape[0], -1)
        weight = weight_matrix(self.module).detach()
        columns = weight[:, self.channel_index.reshape(-1)]
        return columns.reshape(weight.shape[0], *self.channel_index.shape)

    def flat_weight(self) -> Tensor:
        """The whole weight as (out, in·taps), columns as :meth:`input_features` numbers them."""
        weight = dense_conv_weight(self.module) if self.kind == "conv" else weight_matrix(self.module).detach()
        return weight.reshape(weight.shape[0], -1)

    def input_features(self) -> Tensor:
        """(channels, features) indices into the flattened weight's columns (in_features of a Linear, in·taps
        of a conv) that read each group channel."""
        if self.kind == "linear":
            return self.channel_index
        taps = self.module.weight[0, 0].numel()
        return (self.channel_index[:, :, None] * taps + torch.arange(taps)).reshape(len(self.channel_index), -1)

    def write_weight(self, channel_idx: Tensor, canonical: Tensor) -> None:
        """Write ``canonical`` (out, len(channel_idx), taps) into the columns of ``channel_idx``."""
        weight = self.module.weight
        with torch.no_grad():
            if self.kind == "conv":
                cols = self.channel_index[channel_idx].reshape(-1)
                columns = canonical.reshape(weight.shape[0], len(cols), *weight.shape[2:]).to(weight)
                if self.grouped:  # into the dense form, then back: only each conv group's own block is kept
                    dense = dense_conv_weight(self.module)
                    dense[:, cols] = columns
                    weight.copy_(grouped_blocks(dense, self.module.groups))
                else:
                    weight[:, cols] = columns
            elif is_transposed_linear(self.module):
                cols = self.channel_index[channel_idx].reshape(-1)
                weight[cols, :] = canonical.reshape(weight.shape[1], -1).T.to(weight)
            else:
                cols = self.channel_index[channel_idx].reshape(-1)
                weight[:, cols] = canonical.reshape(weight.shape[0], -1).to(weight)


@dataclass
class Group:
    """Channels that must be pruned together, resolved against the model as it is now."""

    name: str  # name of the root layer, the first producer Torch-Pruning found
    channels: int
    producers: list[Producer]
    consumers: list[Consumer]
    root: nn.Module = field(repr=False)
    root_fn: object = field(repr=False)
    batchnorms: list[Producer] = field(default_factory=list)  # BatchNorms on the group's channels
    #: whether the channels are added to other layers' outputs (a residual stream), not block-internal
    residual: bool = False
    #: (channels, w): the coupled layers' channels each group channel stands for. One each, unless grouped
    #: convolutions read or write them: then the channels at the same position of every conv group go together
    #: (so that every conv group keeps as many), and a group channel is w of them
    members: Tensor | None = None


def write_consumer_weights(group: Group, keep_idx, consumer_weights: dict[str, Tensor] | None,
                           consumer_biases: dict[str, Tensor] | None = None) -> Tensor:
    """Write replacement canonical weights into the kept columns of the named consumers, and replacement
    biases (before the removal, by either graph); returns ``keep_idx`` as a CPU LongTensor."""
    keep_idx = torch.as_tensor(keep_idx, dtype=torch.long).cpu()
    by_name = {c.name: c for c in group.consumers}
    for name in list(consumer_weights or {}) + list(consumer_biases or {}):
        if name not in by_name:
            raise StructPruneError(f"consumer_weights: {name!r} is not a consumer of group {group.name}")
    for name, weight in (consumer_weights or {}).items():
        by_name[name].write_weight(keep_idx, weight)
    for name, bias in (consumer_biases or {}).items():
        consumer = by_name[name]
        module_bias = consumer.module.bias
        with torch.no_grad():
            if module_bias is not None:
                module_bias.copy_(bias.to(module_bias))
            elif consumer.batchnorm is not None:  # BN(y + b) is BN(y) with the running mean lowered by b
                consumer.batchnorm.running_mean.sub_(bias.to(consumer.batchnorm.running_mean))
            elif not consumer.normalized:
                raise StructPruneError(f"consumer_biases: {name} has no bias to replace")
            # else a BatchNorm that shares the output with other layers: the shift is left to its recalibration
    return keep_idx
