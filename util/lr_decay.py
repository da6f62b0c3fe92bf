"""Layer-wise learning-rate decay (ELECTRA, BEiT) for fine-tuning a ViT, as in the reference."""


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=.75):
    """Optimizer parameter groups: the lr of layer ``i`` (0 the embeddings, 1..depth the blocks, depth+1 the final
    norm and the head) is scaled by ``layer_decay ** (depth + 1 - i)`` (its group's ``lr_scale``, applied by
    ``util.lr_sched``); 1-D parameters and those in ``no_weight_decay_list`` get no weight decay.

    Frozen parameters (``requires_grad=False``) are left out. Groups come in the order their first parameter appears
    in ``model.named_parameters()`` (the reference's order, which the optimizer's state dict depends on).
    """
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    param_groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(name, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_groups:
            param_groups[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay, "params": []}
        param_groups[group_name]["params"].append(p)
    return list(param_groups.values())


def get_layer_id_for_vit(name, num_layers):
    """The layer a ViT parameter belongs to: 0 for the embeddings, ``i + 1`` for block ``i``, ``num_layers`` for
    everything after the blocks (final norm, head)."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    return num_layers
