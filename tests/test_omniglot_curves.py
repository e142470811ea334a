"""A few meta-updates of training on real Omniglot give the same loss curve for the fast and the
reference learner.

Trajectories of two correct implementations diverge chaotically in float32 (docs/NUMERICS.md: a 1e-6
perturbation of one inner learning rate changes parameter updates by ~25% after three Adam steps), so
the curve is compared in float64, where rounding differences stay near 1e-12 over a few updates:
every step's loss, accuracy and the final parameters must agree to 1e-9 relative (conv biases and
their LSLR rates, whose gradients are pure rounding noise, are checked to have moved negligibly).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mamlpp_fast.config import load_args
from mamlpp_fast.data import MetaLearningSystemDataLoader
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
from mamlpp_fast.reference import MAMLFewShotClassifier as Reference
from test_fast_equivalence import FP64_RTOL, assert_same_after_adam

OMNIGLOT = Path(os.environ.get("MAMLPP_OMNIGLOT_DIR")
                or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot")
UPDATES = 5


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot not found at {OMNIGLOT}")
def test_fast_and_reference_loss_curves_agree_on_omniglot():
    args = load_args({
        "dataset_name": "omniglot", "dataset_path": str(OMNIGLOT), "image_height": 28, "image_width": 28,
        "image_channels": 1, "train_val_test_split": [0.70918052988, 0.03080714725, 0.2606284658],
        "indexes_of_folders_indicating_class": [-3, -2], "train_seed": 0, "val_seed": 0,
        "num_classes_per_set": 5, "num_samples_per_class": 1, "num_target_samples": 2, "batch_size": 2,
        "cnn_num_filters": 16, "num_stages": 4, "conv_padding": True, "max_pooling": True,
        "per_step_bn_statistics": True, "learnable_bn_gamma": True, "learnable_bn_beta": True,
        "enable_inner_loop_optimizable_bn_params": False,
        "learnable_per_layer_per_step_inner_loop_learning_rate": True,
        "use_multi_step_loss_optimization": True, "multi_step_loss_num_epochs": 10, "second_order": True,
        "first_order_to_second_order_epoch": -1, "number_of_training_steps_per_iter": 3,
        "number_of_evaluation_steps_per_iter": 3, "total_epochs": 10, "dtype": "float64", "device": "cpu",
    })
    loader = MetaLearningSystemDataLoader(args)
    batches = list(loader.get_train_batches(total_batches=UPDATES, augment_images=True))
    assert len(batches) == UPDATES
    ref = Reference(loader.im_shape, "cpu", args)
    fast = Fast(loader.im_shape, "cpu", args)
    fast.load_state_dict(ref.state_dict())
    curve_ref, curve_fast = [], []
    for i, batch in enumerate(batches):
        lr_, _ = ref.run_train_iter(batch, epoch=0)
        lf, _ = fast.run_train_iter(batch, epoch=0)
        curve_ref.append(float(lr_["loss"]))
        curve_fast.append(float(lf["loss"]))
        assert lf["accuracy"] == pytest.approx(lr_["accuracy"], abs=1e-12), i
    for i, (a, b) in enumerate(zip(curve_fast, curve_ref)):
        assert abs(a - b) <= FP64_RTOL * abs(b), f"update {i}: fast {a!r} vs reference {b!r}"
    assert curve_ref[-1] != curve_ref[0]  # the parameters really moved
    # Running means contain their conv layer's bias exactly, and conv biases take Adam steps driven by
    # rounding noise (bounded below 1e-3 * lr per update by assert_same_after_adam): after UPDATES
    # updates the means may differ by up to UPDATES * 1e-3 * lr = 5e-6 absolute, so they are compared
    # with that tolerance; everything else to FP64_RTOL.
    sr, sf = ref.state_dict(), fast.state_dict()
    bound = UPDATES * 1e-3 * ref.optimizer.param_groups[0]["lr"]
    for key in [k for k in sr if "running" in k]:
        diff = float((sf[key] - sr[key]).abs().max())
        assert diff <= bound, f"{key}: max |diff| {diff:.3e} > {bound:.1e}"
        ref.state_dict()[key].copy_(sf[key])  # equalise, so the check below covers the rest
    assert_same_after_adam(ref, fast, FP64_RTOL, seed="omniglot")
