"""Model zoo: does the default pipeline prune every architecture right, or refuse it cleanly?

Every model is built in-process and tiny (random weights, no downloads): structprune's own zoo CNNs; CNNs in
the style of Torch-Pruning's CIFAR zoo (``nets``) (PreAct-ResNet, GoogLeNet-like inception with torch.cat
branches, DenseNet-like concatenation, SE-ResNet, ResNeXt-like grouped convs, a Conv1d net, an
nn.TransformerEncoder classifier); Hugging Face transformers from tiny configs (the families
structprune.models.hf describes, and T5/BART, which it does not); torchvision and timm models when they are
installed. Each is pruned with ``structprune.prune(model, calib, method, 0.5, progress=False)`` (a keep ratio
of 0.5 for every group, the default pipeline: selection, refit, BatchNorm recalibration) for i-SpaSP, PFP and
magnitude on 64 synthetic calibration samples, and checked:

* status: pruned / refused (StructPruneError) / groups skipped with a warning / ERROR (any other exception:
  a bug);
* params and MACs kept (the report's after/before), and for the CNNs the MACs kept with ``Target(0.5)``;
* every output tensor (last_hidden_state, logits, ...) has the dense model's shape;
* transformer invariants: every block's q/k/v/o sizes are whole heads and consistent, the head counts the
  modules keep agree with their weights, ``config.structprune_layers == attention.layer_sizes(model)``;
  attention modules structprune does not describe (nn.MultiheadAttention, T5, BART) are left exactly as
  they were;
* the model saved with ``structprune.save`` loads in a fresh process (one for all models, at the end) and
  gives the same outputs on a fixed batch (max abs diff ≤ 1e-5);
* Torch-Pruning's MetaPruner (L2 magnitude, pruning_ratio=0.5, the output layer ignored) on the same model:
  its time and whether the pruned model runs with the dense output shapes. For BERT/RoBERTa it gets the
  q/k/v head counts and the per-layer patching of benchmarks/bert.py; for the other transformers it is not
  run ("n/a": MetaPruner needs each family's heads configured by hand).

    cd benchmarks && ../.venv/bin/python -m zoo --out-dir results     # ~75 s on 1 CPU thread
    ../.venv/bin/python -m zoo --models resnet20,bert --methods magnitude     # a subset

The package, by concern: ``nets`` (the CNNs; the tests reuse them), ``specs`` (the model list), ``checks``
(outputs, shapes, attention invariants), ``baseline`` (Torch-Pruning's MetaPruner), ``runs`` (one model),
``reload`` (the fresh process), ``report`` (the table and findings), ``__main__`` (the command).
"""
