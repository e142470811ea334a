"""The tiny synthetic MAML++ experiment that the trainer, CLI, plotting and fault tests build on:
every MAML++ part on, a few-filter network and a few iterations, so a whole run takes seconds."""

TINY_BASE = {
    "dataset_name": "synthetic",
    "dataset_path": "synthetic",
    "batch_size": 2,
    "image_channels": 1,
    "num_samples_per_class": 1,
    "num_stages": 2,
    "conv_padding": True,
    "max_pooling": True,
    "per_step_bn_statistics": True,
    "learnable_bn_gamma": True,
    "learnable_bn_beta": True,
    "enable_inner_loop_optimizable_bn_params": False,
    "learnable_per_layer_per_step_inner_loop_learning_rate": True,
    "use_multi_step_loss_optimization": True,
    "multi_step_loss_num_epochs": 2,
    "second_order": True,
    "first_order_to_second_order_epoch": -1,
}


def tiny_config(**overrides):
    """TINY_BASE with `overrides` applied (a new dict)."""
    return {**TINY_BASE, **overrides}
